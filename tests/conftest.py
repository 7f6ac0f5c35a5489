import os
import tempfile

# Tests write the tiny presets to their own cache, never to the user's.
os.environ.setdefault("MOESERVE_CACHE_DIR", tempfile.mkdtemp(prefix="moeserve-test-cache-"))
