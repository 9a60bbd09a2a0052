"""ringlwm.parallel: the validated device mesh and the steps that parallelize a model over it."""

from ringlwm.parallel.mesh import AXES, ParallelDims
from ringlwm.parallel.parallelize import materialize, parallelize_llama

__all__ = ["AXES", "ParallelDims", "materialize", "parallelize_llama"]
