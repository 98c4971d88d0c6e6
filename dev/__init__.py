"""Development helpers: the real ComfyUI host, tiny model fixtures and test datasets.

Nothing here is shipped to ComfyUI users; tests, the demo and the benchmark use it.
"""
