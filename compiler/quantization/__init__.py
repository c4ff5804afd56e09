"""Mixed-precision search (Hessian sensitivity, ILP allocation, Brevitas QAT)."""
