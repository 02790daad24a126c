"""Tuning: the FFT size advisor (:mod:`.fft_advisor`), the kernel autotuner (:mod:`.autotune`; kernels are
registered by their own algorithm modules) and the persistent, per-GPU cache they share (:mod:`.cache`).

Algorithms call ``fft_advisor.good_fft_size``/``good_fft_shape`` for transform sizes and
``autotune.tuned_params`` for kernel configurations; see docs/machinery.md.
"""
