"""DeepSpeed: the only subpackage that imports deepspeed."""
