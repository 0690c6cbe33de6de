"""Dense float64 references, independent of curvcore's own derivative code: the one place tests take them from.

* ``compare``: ``rel``/``assert_rel`` (max-abs relative), ``rel_norm``, ``residual``;
* ``mlp``: the MLP and the losses in plain NumPy (complex-safe) and torch;
* ``derivatives``: complex-step / finite-difference / torch-autodiff Jacobians, gradients, GGN, Hessian;
* ``kronecker``: K-FAC / ACP dense per-layer steps and factors;
* ``esn_mk``: ESN / MK regularised objective and per-sample quantities;
* ``curveball``: the dense quantities of one CurveBall step, Rosenbrock;
* ``pseudo_hessian``: group directions and the cubic model.
"""

from __future__ import annotations

from reference.compare import (rel, report, assert_rel, rel_norm, rel_err, residual)
from reference.mlp import (LEAKY, flatten, unflatten, shapes_of, np_activation, np_mlp, to_np, forward_from,
                           layer_inputs, softmax, loss_value, loss_parts, loss_value_nd, torch_activation,
                           torch_unflatten, torch_loss_of_theta)
from reference.derivatives import (jacobian_cs, jacobian_fd, hessian_fd, dense_ggn_and_grad, loss_of_theta, grad_cs,
                                   dense_hessian, grads, per_example_dz, torch_grad, module_ggn, dense_tangent,
                                   nested_jvp_jets)
from reference.kronecker import (acp_block_step, kfac_kron_step, acp_alpha, kfac_factors, mc_delta)
from reference.esn_mk import (np_act, np_forward, torch_jr, grad_hess, per_sample_grads, auto_rho, granular_ref,
                              lam_value, batch_stats, direction)
from reference.curveball import (DenseCurveBallStep, rosen_jac_np, rosen_residual_np, random_tree, state_with)
from reference.pseudo_hessian import (group_dirs, cubic_model, cubic_model_grad)

__all__ = [
    "DenseCurveBallStep", "LEAKY", "acp_alpha", "acp_block_step", "assert_rel", "auto_rho", "batch_stats",
    "cubic_model", "cubic_model_grad", "dense_ggn_and_grad", "dense_hessian", "dense_tangent", "direction",
    "flatten", "forward_from", "grad_cs", "grad_hess", "grads", "granular_ref", "group_dirs", "hessian_fd",
    "jacobian_cs", "jacobian_fd", "kfac_factors", "kfac_kron_step", "lam_value", "layer_inputs", "loss_of_theta",
    "loss_parts", "loss_value", "loss_value_nd", "mc_delta", "module_ggn", "nested_jvp_jets", "np_act",
    "np_activation", "np_forward", "np_mlp", "per_example_dz", "per_sample_grads", "random_tree", "rel", "rel_err",
    "rel_norm", "report", "residual", "rosen_jac_np", "rosen_residual_np", "shapes_of", "softmax", "state_with",
    "to_np", "torch_activation", "torch_grad", "torch_jr", "torch_loss_of_theta", "torch_unflatten", "unflatten",
]
