"""One file per stage kind; each declares a ``Pass`` (see onnxforge.pipeline.registry) and registers it.

The registry imports every module here the first time it is read, so a new stage is one new file.
"""
