"""All attribution math, behind one import: ``import utils_if``. Each family lives in one module of
the ``influence`` package; this file holds the public names and says where each one's math is.

Sign convention everywhere: **positive = training point z helped test point t** (removing z would
raise t's loss), and score / n_train is the predicted change of t's loss when z is removed.

| family | module | what it computes |
|---|---|---|
| losses | influence.losses | per-sample NLL, MSE, pixel-window MSE, TRAK's margin, minus the margin |
| the problem | influence.problem | model + loss + chosen parameters: per-sample gradients, exact H v (double backward) |
| layer rules | influence.layers | Linear, Conv2d, BatchNorm2d: per-sample gradients, unfolded patches, Kronecker view |
| Method 1 | influence.method1 | score(t, i) = sum_l a_l(t) . G_l[i], G = gradient-norm vectors (the report's) |
| the hand-written MLP | influence.mlp | R-operator H v of a ReLU/softplus MLP with NLL, checked against autograd; K models' gradients at once (the grouped trainer) |
| solvers (registry) | influence.solvers | influence(t, i) = grad L(t)^T (H + lambda I)^-1 grad L(z_i), one class per solver |
| solver settings | influence.settings | each solver's own settings (declared on its class), what a run hands it |
| LiSSA | influence.lissa | h_j = v + (1 - damp) h_{j-1} - H_j h_{j-1} / scale, s = h_t / scale |
| Krylov, exact | influence.krylov | CG on (H + damp I) s = v; Lanczos/Arnoldi top eigenspace; dense solve |
| Kronecker | influence.kronecker | K-FAC S (x) A, EK-FAC eigenvalue-corrected, factored damping (all pairs in closed form) |
| the sweep | influence.sweep | s_test . grad L(z_i) for every z_i in closed form; per-position maps of conv layers |
| TRAK | influence.trak | phi_t^T (Phi^T Phi)^-1 phi_i (1 - p_i), Kronecker projection of Linear gradients |
| TracIn | influence.tracin | sum_c lr_c grad L(t; theta_c) . grad L(z; theta_c); self-influence |
| Method 3 | influence.replay, replay_sgd, replay_adam | dF/dw_i through every SGD or Adam step (exact reverse mode, MAGIC) |
| metasmoothness | influence.smoothness | can a run be attributed: S_hat (Def. 2) from theta(z), theta(z + h v), theta(z + 2 h v), its interval, the three-way verdict |
| metrics | influence.metrics | Spearman, LDS, bootstrap, Pearson, top-k overlap, ROC AUC |
"""
from influence.layers import (RULES, LayerRule, capturable_owners, conv_sample_weight_grads,  # noqa: F401
                              kronecker_owners, layer_rule, linear_owners, module_sample_grads, unfold_patches)
from influence.lissa import LISSA_FOLD_SAMPLES, LISSA_SETTLED, LissaDiverged, lissa  # noqa: F401
from influence.losses import (SampleLoss, masked_mse_sample_loss, mse_sample_loss,  # noqa: F401
                              negative_margin_sample_loss, nll_sample_loss, trak_margin, weighted_batch_loss)
from influence.method1 import (batch_row_norms, conv_per_sample_channel_norms, method1_scores,  # noqa: F401
                               normalize_rows, outliers, per_sample_row_norms)
from influence.metrics import (average_ranks, bootstrap_mean, datamodel_predictions, fraction_found, lds,  # noqa: F401
                               pearson, roc_auc, spearman_columns, top_indices, top_k_overlap)
from influence.mlp import MLP_ACTIVATIONS, MlpHvp, grouped_gradients, mlp_check, mlp_layers, relu_mlp_layers  # noqa: F401
from influence.kronecker import KroneckerCurvature  # noqa: F401
from influence.krylov import (arnoldi_inverse_hvp, conjugate_gradient, exact_inverse_hvp,  # noqa: F401
                              hessian_subset, lanczos_eigenpairs)
from influence.problem import SIGN_CONVENTION, InfluenceProblem, select_parameters  # noqa: F401
from influence.replay import (METHOD3_SIGN_CONVENTION, WINDOW_UNITS, AdamRun, Replay, ReplayMismatch,  # noqa: F401
                              SgdRun, forward_checked, replay_error, step_bar, window_start)
from influence.replay_adam import AdamReplay  # noqa: F401
from influence.replay_sgd import SgdReplay  # noqa: F401
from influence.smoothness import DEFAULT_STEP as SMOOTHNESS_STEP  # noqa: F401
from influence.smoothness import (REJECT_BELOW, VOUCH_AT, decision, metasmoothness, random_direction,  # noqa: F401
                                  verdict, weight_sets)
from influence.settings import SolverSettings, setting  # noqa: F401
from influence.solvers import (SOLVERS, ConjugateGradient, Solver, compute_influences,  # noqa: F401
                               influence_chunks, influences_from_test_grads, inverse_hvp, kronecker_curvature,
                               register, solver_config, solver_for, solver_help, solver_names)
from influence.sweep import conv_position_influence, influence_sweep  # noqa: F401
from influence.tracin import sample_grad_sq_norms, tracin, tracin_self_influence  # noqa: F401
from influence.trak import KroneckerProjection, Trak, trak_scores  # noqa: F401

KRONECKER_SOLVERS = tuple(name for name, solver in SOLVERS.items() if solver.kronecker)
