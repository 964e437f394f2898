"""Pruning: fewer or zero weights, with a quality gate.

Stages: ``channels`` (structured channel pruning: really smaller, faster layers; ``coupling`` finds
what must shrink together into ``channel_groups``, ``importance`` what goes first, ``repair``
refits the next layers by least squares), ``magnitude`` (zeros in the weights) and ``low_rank``
(dense layers factored by SVD). They share ``backoff`` (lower the strength until the quality gate
holds), ``activations`` (a model's intermediate values on samples) and ``graph`` (initializer edits
and the check every rewritten model passes).
"""
