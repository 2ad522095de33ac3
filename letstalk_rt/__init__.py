"""letstalk-rt: a real-time streaming talking-avatar SDK built on the LetsTalk diffusion transformer."""

__version__ = "0.1.0"

# Every answer of a letstalk-rt server carries its version in this header (server/app.py); the SDK reads it to tell a
# URL that leads elsewhere, or to an older server without the route asked for, from a missing session or avatar.
VERSION_HEADER = "X-LetsTalk-Version"
