"""letstalk-rt: a real-time streaming talking-avatar SDK built on the LetsTalk diffusion transformer."""

__version__ = "0.1.0"
