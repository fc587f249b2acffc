"""Family-agnostic MoE utilities: discovery of MoE blocks, routing-trace capture and file format,
expert placement solvers (MoETuner, ExFlow, baselines), expert-parallel execution over gloo, and an
alpha-beta cost model for projected expert-parallel latency.

Torch is imported only by the modules that need it (layers, trace capture, ep).
"""
