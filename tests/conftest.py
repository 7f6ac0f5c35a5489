import os
import tempfile

from tests import triton_interpreter

triton_interpreter.enable()  # before any module with kernels is imported

# Tests write the tiny presets to their own cache, never to the user's.
os.environ.setdefault("MOESERVE_CACHE_DIR", tempfile.mkdtemp(prefix="moeserve-test-cache-"))
