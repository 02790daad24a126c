"""Tuning: FFT size advisor, kernel autotuner and their persistent cache (see :mod:`.cache`)."""
