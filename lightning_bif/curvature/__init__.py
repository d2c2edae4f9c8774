"""The curvature of the training objective at w*: Hessian-vector products, Lanczos, eigenpairs, stiffness."""
