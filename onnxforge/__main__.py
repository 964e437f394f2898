from onnxforge.cli import entry

entry()
