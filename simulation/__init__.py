"""simulate.py's logic: a user's scan, a method run over its slab at each target, the results written (above models/)."""
from simulation.outputs import PICTURE_SLICES, write_outputs
from simulation.trajectory import Simulation, describe_method, load_method, manipulate_slab, prepare, run

__all__ = ["PICTURE_SLICES", "Simulation", "describe_method", "load_method", "manipulate_slab", "prepare", "run",
           "write_outputs"]
