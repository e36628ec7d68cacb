"""What tests, the demo and the benchmark need and real use does not: random-weight
architectures in diffusers format, the synthetic demo dataset, the naive reference."""
