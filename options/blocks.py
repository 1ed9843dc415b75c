"""The settings, typed: one dataclass per block of ``Implementation.json``, each field with its
default, its kind and valid values, and one help line (``spec``, influence.settings.setting). This
is the one place for each default and help: the settings check (options.check, one small check per
kind), the ``-h`` text, ``Implementation.json``'s comments (options.default_file) and the typed
``Settings`` every script's ``main`` gets are made from it. The Method-2 blocks are made from the
solver registry (options.method2); the training run is read as one ``Recipe`` (options.recipe).
"""
from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from influence.settings import setting as spec  # one field maker for the blocks and the solvers' own settings
from options.method2 import lds_methods, method2_class  # the Method-2 blocks, made from the registry


def score_fields(block_value: Any) -> dict:
    """The settings of a typed block that change its method's scores (every field not marked
    ``scores=False``; nested blocks left out), as a plain dict: the trust table matches on these."""
    return {f.name: getattr(block_value, f.name) for f in fields(block_value)
            if f.metadata.get("scores", True) and not f.metadata.get("block")}


def block(make: type):
    """A nested block of settings (``make()`` is its default: a dataclass, or a function that builds
    one, as the Method-2 blocks are built from the registry)."""
    return field(default_factory=make, metadata={"block": True})


def block_class(f) -> type:
    """The dataclass of a nested block's field."""
    return type(f.default_factory())


@dataclass
class SmoothnessCheck:
    """The metasmoothness check every Method-3 script runs before its replay (influence/smoothness.py)."""
    smoothness_directions: int = spec(8, "before the replay, measure whether the run is smooth in its data weights "
                                      "(metasmoothness S_hat, Definition 2) over this many Gaussian directions over all "
                                      "points (1 + 2 x this many trainings; the MNIST MLP trains them side by side); the "
                                      "verdict reads its interval: at 8 the typical near-boundary one is 0.006 wide against "
                                      "a 0.040 gap between attributable and not, the widest 0.17 (docs/results.md); "
                                      "0 = skip", 'int', (0, 64),
                                      scores=False)
    smoothness_step: float = spec(0.1, "h: the weights move by h v and 2 h v, v ~ N(0, I); 0.1 moves them as far (L2) "
                                  "as a 1% drop, the question the verdict is calibrated on", 'float', (1e-6, 1.0),
                                  scores=False)


@dataclass
class FfdnetMethod3(SmoothnessCheck):
    """Method 3 of expTest's fine-tuning runs (m3_Test.py; the check on seed 0's fine-tuning)."""
    checkpoint_interval: int = spec(0, "steps between kept (weights, Adam moments) states; 0 = sqrt(steps). Memory:"
                                       " (3 x steps/interval + 4 x interval) x the model's parameters", 'int', (0, None))
    replay_tolerance: float = spec(0.0001, "the replay must end this close (relative) to a real fine-tuning run, "
                                           "else nothing is written", 'float', (0.0, None))
    top_k: int = spec(100, "length of the helpful / harmful lists", 'int', (1, None))


@dataclass
class Finetune:
    """The fine-tuning schedule of every expTest run (Adam or SGD with momentum, BN statistics fixed)."""
    epochs: float = spec(0.5, "fine-tuning length in epochs of the training patches (fractions allowed)", 'float', (1e-06, None))
    learning_rate: float = spec(0.0001, "fine-tuning Adam learning rate", 'float', (0.0, None))
    batch_size: int = spec(32, "fine-tuning batch size", 'int', (1, None))
    eps_root: float = spec(0.0, "Adam with this epsilon inside the square root too (0 = torch.optim.Adam; 1e-6 or more: "
                                "a run smooth in its data weights, docs/methods.md)", 'float', (0.0, None))
    optimizer: str = spec('adam', "adam (torch.optim.Adam, or with eps_root) | sgd: torch.optim.SGD with momentum "
                                  "(no division by the root of the second moment; set a larger learning_rate)",
                          'choice', ('adam', 'sgd'))
    momentum: float = spec(0.9, "sgd: its momentum", 'float', (0.0, 0.999))
    lr_schedule: str = spec('constant', "constant | linear | cosine: the learning rate decays from learning_rate "
                                        "towards 0 at the last step", 'choice', ('constant', 'linear', 'cosine'))


@dataclass
class FfdnetWindow(Finetune):
    """The training's final window (ffdnet.recipe attributable sets it): after the ffdnet.epoch epochs,
    this many more epochs with BatchNorm statistics frozen (each patch's loss its own), a fresh
    optimiser and the learning rate decaying to 0. Part of training (FFDNet_Train saves its start);
    Method 3 and ffdnet_test/ldsTest.py ask what the patches did in it."""
    epochs: float = spec(0.0, "the window's length in epochs of the training patches (fractions allowed); 0 = no "
                              "window (the report's training)", 'float', (0.0, None))
    learning_rate: float = spec(0.0001, "the window's first learning rate (it decays by lr_schedule)", 'float', (0.0, None))
    lr_schedule: str = spec('linear', "linear (to 0 at the window's end: small last steps, a run smooth in its data "
                                      "weights) | cosine | constant", 'choice', ('constant', 'linear', 'cosine'))


@dataclass
class FfdnetLds:
    """The denoiser's single-model ground truth (ffdnet_test/ldsTest.py): rerun the training's final
    window with random patches weighted 0 and score each method's prediction of every target's change."""
    drop_fractions: list[float] = spec([0.01, 0.05], "one set of num_subsets reruns per fraction of the window's "
                                                     "patches dropped", 'float_list', None)
    num_subsets: int = spec(16, "random subsets per fraction (more later reuse the ones done)", 'int', (3, None))
    test_images: int = spec(2, "targets = the pixel windows of ffdnet.attribution.points and the whole image of the "
                               "first n ffdnet.attribution.images", 'int', (1, 100))
    methods: list[str] = spec(['m3', 'ekfac', 'lissa', 'm1'], "m3: Method 3 through the window | ekfac, lissa, ...: "
                              "pixel-window influence with that Method-2 solver (ffdnet.method2's other settings) | "
                              "m1: Method 1 (ffdnet.explain.m1_layer and m1_mode; pixel targets only)", 'str_list', None)
    seed: int = spec(0, "draws the subsets", 'int', (0, None))
    top_k: int = spec(100, "beside the LDS, expTest's view: rerun without Method 3's top k patches of each target "
                           "(and k random ones per image); 0 = skip", 'int', (0, None))
    bootstrap: int = spec(1000, "bootstrap draws (over subsets) for each LDS's 95% interval", 'int', (10, None),
                          scores=False)


@dataclass
class FfdnetExplain:
    """The denoiser's explainability test (expTest.py): counterfactual fine-tuning."""
    test_images: int = spec(1, "targets = ffdnet.attribution.points of the first n attribution images", 'int', (1, 100))
    rankings: list[str] = spec(
        ['m3_window', 'm3_whole', 'm2_window', 'm2_whole', 'm1', 'random'],
        "Method 3 (window, whole image), pixel-window influence, whole-image influence, Method 1, random", 'subset', ('m3_window', 'm3_whole', 'm2_window', 'm2_whole', 'm1', 'random'))
    manipulations: list[str] = spec(['remove', 'corrupt'], "remove the top-k patches | corrupt them (clean target "
                                                           ":= noisy input)", 'subset', ('remove', 'corrupt'))
    k_values: list[int] = spec([500, 2000], "patches manipulated per run", 'int_list', None)
    seeds: int = spec(2, "fine-tuning repeats (data order); each manipulated run is paired with its seed's control", 'int', (1, 100))
    m1_layer: int = spec(11, "Method 1 ranking: this layer of ffdnet.method1.layers ...", 'int', (0, 100))
    m1_mode: str = spec('raw', "... in this mode (raw | normalized | remove_out)", 'choice', ('raw', 'normalized', 'remove_out'))
    finetune: Finetune = block(Finetune)
    maps: int = spec(4, "top patches per target drawn with their per-position influence (kfac/ekfac only; 0 = none)", 'int', (0, 100))


@dataclass
class Attribution:
    """Which test pixels to explain."""
    images: list[str] = spec(['01', '02'], "test image names (file name without extension) in ffdnet.test_dir", 'str_list', None)
    points: list[list[int]] = spec(
        [[64, 64], [64, 192], [192, 64], [192, 192]],
        "(row, col) in full-image pixels", 'points', None)
    vis_num: int = spec(5, "training patches per row in the figures", 'int', (1, 100))


@dataclass
class FfdnetMethod1:
    """Method 1 on the denoiser."""
    record: bool = spec(True, "accumulate per-patch gradient-norm vectors while training", 'bool', None)
    grad_mode: str = spec('batch', "batch | per_sample (each patch's contribution to the batch gradient)", 'choice', ('batch', 'per_sample'))
    layers: list[int] = spec([1, 5, 11], "conv layer numbers (the original: l0 = first conv, l5, l11)", 'int_list', None)
    mode: str = spec('raw', "raw | normalized (each patch's vector / its sum) | remove_out (drop patches with total"
                            " norm > outlim)", 'choice', ('raw', 'normalized', 'remove_out'))
    outlim: float = spec(5.0, "remove_out mode: patches with total gradient norm above this are dropped", 'float', (0.0, None))
    activation: str = spec('block', "block = after the block's ReLU; conv = the raw conv output (the original)", 'choice', ('block', 'conv'))
    top_k: int = spec(100, "length of the top list per point", 'int', (1, None))


@dataclass
class FfdnetTest:
    """FFDNet_Test.py."""
    model: str = spec('', "\"\" = the model trained with these settings; a .pth path; or \"official\"", 'path_or_empty', None)
    noise_level_img: float = spec(25.0, "the one test sigma (the original had two that disagreed)", 'float', (0.0, 255.0))
    is_clip: bool = spec(True, "quantise the noisy input to 8 bits", 'bool', None)
    border: int = spec(0, "pixels cropped before PSNR/SSIM", 'int', (0, None))
    save_images: bool = spec(True, "write the noisy (_L) and denoised (_E) images", 'bool', None)


@dataclass
class FfdnetQuestion:
    """The denoiser's question in one step (ffdnet_test/run_pipeline.py)."""
    best_solver: str = spec('ekfac', "the best measured pixel-window ranking: this solver over all training patches "
                            "(docs/results.md)", 'solver', 'ffdnet')


@dataclass
class Ffdnet:
    """The FFDNet side: the denoiser, its data and training."""
    seed: int = spec(1, "seeds the init, the data order and the fixed noise", 'int', (0, None))
    use_gpu: bool = spec(False, "CUDA when true and a GPU exists (logged), else CPU", 'bool', None, scores=False)
    is_gray: bool = spec(True, "true: 15 conv x 64 channels, 1 channel; false: 12 x 96, RGB", 'bool', None)
    layout: str = spec('bn', "bn (the original's Conv-BN-ReLU blocks) | plain (the official, BN-free)", 'choice', ('bn', 'plain'))
    residual: bool = spec(False, "true: the net predicts the noise (DnCNN-style); false: the clean image (FFDNet, "
                                 "the original)", 'bool', None)
    channel_order: str = spec('rgb', "rgb | bgr (the original author's checkpoint was trained on BGR)", 'choice', ('rgb', 'bgr'))
    train_dir: str = spec('data/ffdnet/train', "filled by data/ffdnet_data.py on first use (Train400 or "
                                               "scikit-image photos)", 'str', None)
    val_dir: str = spec('data/ffdnet/test', "folder of validation images (PSNR each epoch)", 'str', None, scores=False)
    test_dir: str = spec('data/ffdnet/test', "folder of test images (FFDNet_Test.py, attribution)", 'str', None)
    patch_size: int = spec(64, "the original: 64 x 64 tiles on a non-overlapping grid", 'int', (8, 1024))
    stride: int = spec(64, "patch grid step (the original: 64, no overlap)", 'int', (1, 1024))
    max_patches: int = spec(0, "0 = all patches; n = the first n (small runs, tests)", 'int', (0, None))
    sigma: list[float] = spec([0, 75], "training noise level range (0-255 units), one sigma per patch", 'range', (0.0, 255.0))
    fixed_noise: bool = spec(True, "one seeded noise draw per patch (a well-defined training point)", 'bool', None)
    val_sigma: float = spec(25.0, "validation noise level (0-255 units)", 'float', (0.0, 255.0), scores=False)
    epoch: int = spec(20, "training epochs (the original: 20)", 'int', (1, None))
    batch_size: int = spec(8, "training batch size (the original: 8)", 'int', (1, None))
    learning_rate: float = spec(0.001, "Adam, MSE loss, orthogonal conv init (the original recipe)", 'float', (0.0, None))
    lr_decay_epochs: list[int] = spec([], "epochs at which the learning rate is divided by 10 ([] = constant)", 'int_list', None)
    bn_recalibrate_batches: int = spec(0, ">0: re-estimate BatchNorm statistics over this many batches each epoch", 'int', (0, None))
    train_checkpoints: int = spec(5, "save a checkpoint every k epochs", 'int', (1, None), scores=False)
    init_checkpoint: str = spec('', "fine-tune from this checkpoint (\"\" = train from scratch)", 'path_or_empty', None)
    recipe: str = spec('report', "a preset of the training recipe (options/recipe.py): report (the report's) | "
                                 "attributable (a final window Method 3 answers exactly, ffdnet.window; docs/methods.md). "
                                 "It replaces the defaults, never a value you set", 'choice', ('report', 'attributable'))
    activation: str = spec('relu', "relu (the report's) | softplus (the same layers, a smooth run)", 'choice',
                           ('relu', 'softplus'))
    window: FfdnetWindow = block(FfdnetWindow)
    test: FfdnetTest = block(FfdnetTest)
    method1: FfdnetMethod1 = block(FfdnetMethod1)
    attribution: Attribution = block(Attribution)
    method2: Any = block(lambda: method2_class("ffdnet")())  # options/method2.py
    explain: FfdnetExplain = block(FfdnetExplain)
    method3: FfdnetMethod3 = block(FfdnetMethod3)
    lds: FfdnetLds = block(FfdnetLds)
    question: FfdnetQuestion = block(FfdnetQuestion)


@dataclass
class MnistMethod3(SmoothnessCheck):
    """Method 3: the exact attribution of the trained run (m3_Test.py)."""
    mode: str = spec('staTest0', "which model (same naming as method1.mode); Train.py's run is replayed", 'str', None,
                     scores=False)
    target: str = spec('loss', "loss | margin (the test target differentiated)", 'choice', ('loss', 'margin'))
    test_sample_num: int = spec(10, "how many of the selected test images", 'int', (1, 10000), scores=False)
    checkpoint_interval: int = spec(0, "steps between kept (weights, momentum) states; 0 = sqrt(steps). Memory: (2 "
                                       "steps/interval + interval) x 109,386 floats", 'int', (0, None), scores=False)
    test_chunk: int = spec(100, "test images per backward walk (one walk = one forward recomputation + the backward"
                                " pass)", 'int', (1, 10000), scores=False)
    replay_tolerance: float = spec(1e-05, "the replayed final weights must match the saved model to this relative "
                                          "error, else nothing is computed", 'float', (0.0, None), scores=False)
    top_k: int = spec(100, "length of the helpful / harmful lists", 'int', (1, 60000), scores=False)
    if_dir: str = spec('if', "sub-folder of output_dir for Method 3 files", 'str', None, scores=False)


@dataclass
class MnistMethod1:
    """Method 1: gradient-norm vectors x activations."""
    mode: str = spec('staTest0', "name of the model/run (staTest0..5 in the stability study)", 'str', None,
                     scores=False)
    grad_mode: str = spec('batch', "batch (the report's) | per_sample (exact per-image norms)", 'choice', ('batch', 'per_sample'))
    skip_first_epoch: bool = spec(True, "the original recorded epochs 2..20 only", 'bool', None)
    layers: list[str] = spec(['fc1', 'fc2'], "layers whose activations score training images (the original: fc1, "
                                             "fc2)", 'subset', ('fc1', 'fc2', 'fc3'))
    top_k: int = spec(100, "length of the \"top\" list written per test image", 'int', (1, 60000), scores=False)


@dataclass
class Stability:
    """The stability test (staTest.py)."""
    seeds: list[int] = spec([0, 1, 2, 3, 4, 5], "models staTest0..staTest5, trained with these seeds", 'int_list', None)
    methods: list[str] = spec(
        ['method1', 'method2', 'method3'],
        "tables per method (method3: the exact attribution of each run; about 10 min per model here)", 'subset', ('method1', 'method2', 'method3'))
    top: int = spec(100, "length of the top lists compared across seeds (the report: 100)", 'int', (1, 60000))


@dataclass
class Mislabel:
    """Finding flipped labels (mislabelTest.py)."""
    train_subset: int = spec(0, "0 = all 60,000 training images", 'int', (0, 60000))
    fraction: float = spec(0.1, "fraction of the labels flipped (seeded) to another class", 'float', (0.001, 0.9))
    seed: int = spec(0, "the flips, the model's init and data order, the Fisher labels", 'int', (0, None))
    epoch: int = spec(20, "the report's recipe", 'int', (1, None))
    checkpoint_every: int = spec(1, "TracIn checkpoints (epochs)", 'int', (0, None))


@dataclass
class LeaveOneOut:
    """Leave-one-out retraining in ldsTest."""
    test_num: int = spec(2, "leave-one-out: the first n test images (0 = no leave-one-out)", 'int', (0, 10000))
    k: int = spec(20, "leave-one-out: top-k helpful, top-k harmful and k random points per test image", 'int', (1, 10000))
    seeds: int = spec(5, "leave-one-out: retrainings per removed point (seeds)", 'int', (1, None))
    rank_by: str = spec('if_ekfac', "leave-one-out: the method whose top-k lists are removed", 'choice', lds_methods)


@dataclass
class LissaDeep:
    """The deeper LiSSA row of ldsTest."""
    recursion_depth: int = spec(3000, "if_lissa_deep: LiSSA depth t", 'int', (1, None))
    repeats: int = spec(5, "if_lissa_deep: LiSSA repeats r", 'int', (1, None))


@dataclass
class Lds:
    """Ground truth (ldsTest.py): the linear datamodeling score and leave-one-out."""
    setting: str = spec('algorithm', "algorithm: subset models from scratch, each its own seed (what training does "
                                     "on average) | single_model: the base run with the dropped points weighted 0, "
                                     "same seed and order (what this network would have become)", 'choice', ('algorithm', 'single_model'))
    drop_fractions: list[float] = spec(
        [0.01, 0.05, 0.1, 0.5],
        "single_model: one set of num_subsets models per fraction dropped (the main table: the one nearest 5%)", 'float_list', None)
    method3_test_num: int = spec(100, "m3_replay (Method 3) runs on the first n test images (one backward walk per "
                                      "100)", 'int', (1, 10000))
    train_subset: int = spec(5000, "the first n training images (dattri's MNIST benchmark size)", 'int', (10, 60000))
    test_ids: int | list[int] = spec(500, "n = the first n test images, or a list of test indices", 'lds_test_ids', None)
    subset_fraction: float = spec(0.5, "each subset model trains on this fraction of train_subset", 'float', (0.01, 0.99))
    num_subsets: int = spec(100, "M subsets (more later reuse the ones done)", 'int', (3, None))
    seeds_per_subset: int = spec(2, "models per subset, outputs averaged (lowers training noise)", 'int', (1, None))
    epoch: int = spec(40, "the report's recipe (SGD lr 0.003, momentum 0.9, wd 0.001, batch 8); 40 epochs converge "
                          "(README)", 'int', (1, None))
    seed: int = spec(0, "draws the subsets, the LOO random points and the models' seeds", 'int', (0, None))
    group_size: int = spec(16, "models trained at once by the grouped trainer", 'int', (1, 10000))
    keep_weights: bool = spec(False, "true: also keep every retrained model's weights (.pth beside its outputs)", 'bool', None)
    methods: list[str] = spec(
        ['m1_batch_raw', 'm1_batch_normalized', 'm1_per_sample_raw', 'm1_per_sample_normalized', 'if_ekfac', 'if_kfac', 'if_kfac_factored', 'if_exact_last', 'if_lissa', 'if_lissa_deep', 'if_cg', 'grad_dot', 'grad_cos', 'ensemble_m1_batch_raw', 'ensemble_if_ekfac', 'ensemble_if_kfac_factored', 'ensemble_grad_dot', 'm3_replay', 'trak', 'ensemble_trak', 'if_arnoldi'],
        "the attributions ldsTest scores (see docs/scripts.md: ground truth)", 'subset', lds_methods)
    ensemble_seeds: list[int] = spec([0, 1, 2, 3, 4, 5], "base models (the first is THE base model); ensembles "
                                                         "average over all", 'int_list', None)
    solver_test_num: int = spec(20, "LiSSA and CG (HVP-based, slow for many test vectors) run on the first n test "
                                    "images only", 'int', (1, 10000))
    lissa_deep: LissaDeep = block(LissaDeep)
    cg_damps: list[float] = spec([0.01, 0.1, 1, 10], "one CG run per damping (method2.damp); non-convergence is "
                                                     "flagged in the table", 'float_list', None)
    cg_max_iter: int = spec(100, "CG iterations per if_cg_d* row", 'int', (1, None))
    ekfac_damp_factors: list[float] = spec(
        [0.01, 0.03, 0.3, 1],
        "extra EK-FAC rows at these damping factors (the default 0.1 is if_ekfac)", 'float_list', None)
    kfac_factored_damp_factors: list[float] = spec(
        [0.01, 0.3, 1, 3],
        "the same for K-FAC with factored damping (the default 0.1 is if_kfac_factored)", 'float_list', None)
    bootstrap: int = spec(1000, "bootstrap draws for the 95% interval over test images", 'int', (10, None))
    loo: LeaveOneOut = block(LeaveOneOut)


@dataclass
class MnistExplain:
    """The explainability test (expTrain.py / expTest.py)."""
    m2_lists: list[str] = spec(['helpful'], "which Method-2 (and Method-3) lists to manipulate: helpful, harmful", 'subset', ('helpful', 'harmful'))
    n_values: list[int] = spec(
        [0, 200, 500, 1000, 2000, 5000, 10000],
        "explainability test: how many training images are manipulated (N) per run; 0 = the base model", 'int_list', None)
    group_size: int = spec(8, "models trained at once per process (batched; 8 keeps the weights in cache)", 'int', (1, 10000))


@dataclass
class Question:
    """The question in one step (run_pipeline.py): which methods answer it, and how."""
    methods: list[str] = spec(['method1', 'method2', 'method3'], "the methods run_pipeline runs for the chosen test "
                              "images (method3 only within method3_budget_s)", 'subset', ('method1', 'method2', 'method3'))
    best_solver: str = spec('kfac_factored', "Method 2's best measured solver, run beside method2.solver when they "
                            "differ (docs/results.md)", 'solver', 'mnist')
    method3_budget_s: float = spec(300.0, "run Method 3 when its estimated check and replay together take at most "
                                          "this many seconds (the replay is skipped when the check says no)",
                                   'float', (0.0, None))
    replay_when_not_smooth: bool = spec(False, "false: when Method 3's check says no (S_hat's interval below the "
                                               "rule's line), its replay is skipped and said; true: replay anyway",
                                        'bool', None)


@dataclass
class Mnist:
    """The MNIST side: the MLP, its training run and the test images."""
    seed: int = spec(0, "seeds python/numpy/torch, the init and the data order", 'int', (0, None))
    use_gpu: bool = spec(False, "CUDA when true and a GPU exists (logged), else CPU", 'bool', None)
    data_dir: str = spec('data', "MNIST IDX files go to data_dir/MNIST/raw (fetched on first use)", 'str', None)
    epoch: int = spec(20, "training epochs (the report: 20)", 'int', (1, None))
    batch_size: int = spec(8, "SGD batch size (the report: 8)", 'int', (1, None))
    learning_rate: float = spec(0.003, "the original recipe: SGD lr 0.003, momentum 0.9, weight decay 0.001", 'float', (0.0, None))
    momentum: float = spec(0.9, "SGD momentum (the report: 0.9)", 'float', (0.0, 1.0))
    weight_decay: float = spec(0.001, "SGD weight decay (the report: 0.001)", 'float', (0.0, None))
    recipe: str = spec('report', "a preset of the whole training recipe (options/recipe.py: optimiser, schedule, batch, "
                                 "epochs, activation, window, lds.epoch): report (the report's) | attributable (more "
                                 "accurate, and Method 3 predicts its removals; docs/methods.md). It replaces the "
                                 "defaults, never a value you set", 'choice', ('report', 'attributable'))
    lr_schedule: str = spec('constant', "constant (the report) | linear | cosine: the learning rate decays from "
                                        "learning_rate towards 0 at the last step", 'choice', ('constant', 'linear', 'cosine'))
    activation: str = spec('relu', "relu (the original) | softplus: a smooth training run, so Method 3's linear "
                                   "prediction holds (README, Method 3)", 'choice', ('relu', 'softplus'))
    logit_scale: float = spec(1.0, "the logits are multiplied by this before the log-softmax (the same layers and "
                                   "parameters; < 1: scaled down, a run smoother in its data weights, Engstrom et al. "
                                   "2025); 1 = the report's network", 'float', (0.001, 100.0))
    train_subset: int = spec(0, "0 = all 60,000 training images; n = the first n (tests, small runs)", 'int', (0, 60000))
    window: float = spec(0, "the attribution window: the data weights act only in the last `window` window_units of "
                            "the run (0 = the whole run); Method 3 walks back only those steps, and ldsTest's "
                            "single-model removals act only there", 'float', (0.0, None))
    window_unit: str = spec('epochs', "epochs | steps | fraction (of all steps) for window", 'choice',
                            ('epochs', 'steps', 'fraction'))
    checkpoint_every: int = spec(0, "Train.py saves a checkpoint every k epochs (TracIn: method2.solver "
                                    "\"tracin\"); 0 = none", 'int', (0, None))
    vis_num: int = spec(5, "how many top training images a figure shows", 'int', (1, 100))
    method: str | list[str] = spec('method2', "explainability test: method1 | method2 | method3, or a list", 'one_or_list', ('method1', 'method2', 'method3'))
    newData: str | list[str] = spec(['algo', 'random'], "explainability test: algo | random | remove_algo | "
                                                        "remove_random (or a list)", 'one_or_list', ('algo', 'random', 'remove_algo', 'remove_random'))
    test_ids: str | list[int] = spec('loss_rank', "\"loss_rank\" (the report's rule, chosen by Test.py), \"all\" "
                                                  "(m2_Test with kfac/ekfac/identity) or a list of test indices", 'test_ids', None)
    test_num: int = spec(10, "loss_rank: how many test images (ranks 0, step, 2*step, ...)", 'int', (1, 10000))
    test_rank_step: int = spec(1000, "loss_rank: step between loss ranks (descending loss)", 'int', (1, 10000))
    explain: MnistExplain = block(MnistExplain)
    lds: Lds = block(Lds)
    mislabel: Mislabel = block(Mislabel)
    stability: Stability = block(Stability)
    method1: MnistMethod1 = block(MnistMethod1)
    question: Question = block(Question)
    vis_method: str = spec('method2', "vis_m2.py draws this method's file: method2 | method3", 'choice', ('method2', 'method3'))
    method3: MnistMethod3 = block(MnistMethod3)
    method2: Any = block(lambda: method2_class("mnist")())  # options/method2.py


@dataclass
class Loaded:
    """What loading found beside the values (not settings): each log's header says it."""
    settings_file: str = ""
    profile_changed: list = field(default_factory=list)   # keys the profile set
    recipe_changed: list = field(default_factory=list)    # keys mnist.recipe's preset set
    recipe_kept: list = field(default_factory=list)       # "key = yours (the preset's: value)"
    renamed: list = field(default_factory=list)           # one line per renamed key read under its new name
    defaults_taken: list = field(default_factory=list)    # keys Implementation.json leaves out
    profiles: dict = field(default_factory=dict)          # the profiles the files define


@dataclass
class Settings:
    """The whole settings file."""
    output_dir: str = spec('results', "every result goes under here (model_zoo/ grad_norm/ act_grad/ if/ fig/ logs/"
                                      " test/)", 'str', None)
    profile: str = spec('report', "\"report\" = the base values; \"quick\" = the values in profiles.quick merged "
                                  "over them", 'str', None)
    threads: int = spec(1, "torch CPU threads: 1 = the same seeded results on any machine (same torch build and CPU"
                           " kind); 0 = all cores (faster influence, last bits may differ)", 'int', (0, 256))
    mnist: Mnist = block(Mnist)
    ffdnet: Ffdnet = block(Ffdnet)
    source: Loaded = field(default_factory=Loaded, metadata={"run": True})  # not a setting


def _setting_fields(cls) -> list:
    """The fields that are settings (not what loading found)."""
    return [f for f in fields(cls) if not f.metadata.get("run")]


def schema(cls: type = None, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """{"a.b.c": (kind, extra)} for every setting, in the file's order (what ``validate`` checks)."""
    cls = cls or Settings
    out: dict[str, tuple[str, Any]] = {}
    for f in _setting_fields(cls):
        key = f"{prefix}{f.name}"
        if f.metadata.get("block"):
            out.update(schema(block_class(f), key + "."))
        else:
            out[key] = (f.metadata["kind"], f.metadata["extra"])
    return out


def help_lines(cls: type = None, prefix: str = "") -> list[str]:
    """One line per setting: its key, default and help (the ``-h`` text's settings part)."""
    cls = cls or Settings
    out = []
    for f in _setting_fields(cls):
        key = f"{prefix}{f.name}"
        if f.metadata.get("block"):
            out += help_lines(block_class(f), key + ".")
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
            out.append(f"  {key} = {default!r}: {f.metadata['help']}")
    return out


def defaults() -> dict:
    """Every setting's default, nested like the settings file."""
    def as_dict(obj) -> dict:
        return {f.name: as_dict(getattr(obj, f.name)) if is_dataclass(getattr(obj, f.name))
                else copy.deepcopy(getattr(obj, f.name)) for f in _setting_fields(obj)}
    return as_dict(Settings())


def typed(settings: dict, cls: type = None):
    """The settings (a checked, nested dict) as typed blocks: ``typed(s).mnist.method2.solver``.
    Keys that are not settings (profiles, settings_file) are left out."""
    if is_dataclass(settings):
        return settings
    cls = cls or Settings
    values = {}
    for f in _setting_fields(cls):
        if f.name not in settings:
            continue
        value = settings[f.name]
        values[f.name] = typed(value, block_class(f)) if f.metadata.get("block") else copy.deepcopy(value)
    return cls(**values)
