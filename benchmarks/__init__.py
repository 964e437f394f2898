"""onnxforge benchmarks: onnxforge side by side with the tools a user would pick instead.

Run ``make bench`` (all cases) or ``python -m benchmarks CASE`` (one case). Every number is a
ratio or a value measured in the same run on the same machine; results go to stdout as markdown
and to ``benchmarks/results/<case>.json`` with a machine description.
"""
