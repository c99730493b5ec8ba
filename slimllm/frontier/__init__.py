"""The deployment frontier: every candidate artifact (the dense model through each quantization type, and pruned
variants through the same ladder) measured with one protocol, the Pareto set per backend, and the choice.

    >>> result = run_frontier("smollm2-135m", FrontierSettings(pruned=["shortgpt:8"]), "cpu-x86", Path("runs/f"))
    >>> result.choice.summary
"""
