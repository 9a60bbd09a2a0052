"""ringlwm.parallel: the validated device mesh and the steps that parallelize a model over it."""

from ringlwm.parallel.mesh import AXES, ParallelDims, fsdp_mesh, mesh_coordinates
from ringlwm.parallel.parallelize import materialize, parallelize_llama

__all__ = ["AXES", "ParallelDims", "fsdp_mesh", "materialize", "mesh_coordinates", "parallelize_llama"]
