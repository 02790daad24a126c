"""Names only: configuration variables, defaults and enumerations of xmipp_accel."""

# Plugin variables a user may set (environment or scipion.conf [PLUGINS])
XMIPP_ACCEL_DEVICE = "XMIPP_ACCEL_DEVICE"          # auto | gpu | cpu
XMIPP_ACCEL_GPU = "XMIPP_ACCEL_GPU"                # default GPU id(s), e.g. "0" or "0,1"
XMIPP_ACCEL_CACHE = "XMIPP_ACCEL_CACHE"            # tuning cache folder (FFT sizes, kernel configs)
XMIPP_ACCEL_PYTHON = "XMIPP_ACCEL_PYTHON"          # interpreter that runs the xmipp-accel command
XMIPP_ACCEL_CHIMERAX = "XMIPP_ACCEL_CHIMERAX"      # ChimeraX executable for the viewers

DEVICE_AUTO, DEVICE_GPU, DEVICE_CPU = "auto", "gpu", "cpu"

# CTF vocabulary (the one set of names; em/ctf.py documents them)
# - correction in reconstruction (--ctf): auto = wiener when the particles have CTF values, else none
CTF_AUTO, CTF_WIENER, CTF_PHASE_FLIP, CTF_NONE = "auto", "wiener", "phase-flip", "none"
CTF_CORRECTIONS = (CTF_WIENER, CTF_PHASE_FLIP, CTF_NONE)
CTF_MODES = (CTF_AUTO,) + CTF_CORRECTIONS
# - what particle images already carry (RELION rlnCtfDataArePhaseFlipped, rlnCtfDataAreCtfPremultiplied)
CTF_IMAGES_NORMAL, CTF_IMAGES_PHASE_FLIPPED, CTF_IMAGES_PREMULTIPLIED = "normal", "phase_flipped", "premultiplied"
CTF_IMAGE_STATES = (CTF_IMAGES_NORMAL, CTF_IMAGES_PHASE_FLIPPED, CTF_IMAGES_PREMULTIPLIED)

# Angular assignment methods
METHOD_PROJMATCH, METHOD_DEEPALIGN = "projmatch", "deepalign"

# Gain orientation (MotionCor2 convention)
GAIN_ROT_NONE, GAIN_ROT_90, GAIN_ROT_180, GAIN_ROT_270 = 0, 1, 2, 3
GAIN_FLIP_NONE, GAIN_FLIP_UPDOWN, GAIN_FLIP_LEFTRIGHT = 0, 1, 2

COMMAND = "xmipp-accel"
