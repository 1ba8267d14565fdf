"""Training: a short visible loop on Lightning Fabric (loop.py) and knowledge distillation (distill.py)."""
