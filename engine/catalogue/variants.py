"""The catalogue of official Kandinsky 5 checkpoints and the settings their authors run them with.

Source of truth: kandinskylab/kandinsky-5 (configs/*.yaml, README model zoo, test.py, magcache_utils.py) and
kandinsky5-architecture.md section 1.2. Each row names the config it comes from (``source``); tests/test_variants.py
checks every row against the reference values written out there. Settings that the reference keeps outside the
YAML:
- shift (video): the reference CLI (test.py) passes ``--scheduler_scale 5.0`` for every model and every README
  command; the YAML ``metrics.scheduler_scale`` is read by no code. The Pro -Diffusers repos' scheduler_config has
  5.0 too. Image Lite: see below.
- size: SD is 512x768 (test.py's default), HD 768x1280 (the HD commands of examples/examples.sh); frames are
  ``24 * seconds // 4 * 4 + 1`` (121 for 5 s, 241 for 10 s).
- The Lite 5 s sft and nocfg MagCache ratios are in ai-forever/Kandinsky-5 configs/config_5s_{sft,nocfg}.yaml
  (after the 2025-10-07 MagCache update), which the stored index holds only through the mirror
  maybleMyers/kandinsky5@de7cd93; that mirror's 10 s sft and nocfg ratios equal kandinskylab's exactly.
- Pro pretrain checkpoints have no config ("-" in the README model zoo, same NFE and latency as sft): they take
  the sft config of their duration and resolution, without MagCache ratios (those were calibrated on sft).
- Pro distilled checkpoints: none is released with a config (the README lists "distil 16 steps" as not done for Pro;
  a kandinskylab/Kandinsky-5.0-I2V-Pro-distilled-5s-Diffusers repo exists with no readable settings), so there is
  no row for them rather than a guess.
- Image Lite (t2i/i2i): steps, guidance and the RoPE scale from configs/config_t2i.yaml and config_i2i.yaml (the
  README's k5_lite_{t2i,i2i}_sft_hd.yaml are these files renamed; the index holds the old names). config_i2i.yaml has
  two stored versions, guidance 3.5 (57bcb40) and 5.0 (116a145); 3.5 is the one of the later mirror
  maybleMyers/kandinsky5@0254232 and diffusers' Kandinsky5I2IPipeline default. Repos and weight files: the README
  model zoo and kandinsky/utils.py get_T2I_pipeline / get_I2I_pipeline (kandinsky5lite_t2i / _i2i.safetensors;
  kandinskylab's config_i2i.yaml names the t2i file, a copy-paste the mirror corrected). -Diffusers repos: diffusers'
  Kandinsky 5 image pipelines' docstrings. The pretrain repos' file names appear in no stored reference file; they
  follow the video pretrain releases' pattern (kandinsky5lite_t2v_pretrain_5s) and only serve to recognise a file.
  Shift 3.0: the image pipelines' own ``scheduler_scale`` default (Kandinsky5T2IPipeline / Kandinsky5I2IPipeline
  ``__call__``), what the README's Python examples run; test.py's 5.0 reaches them only through its CLI. Size
  1024x1024: both pipelines' default (the reference's and diffusers'); I2I without a size takes the source image's
  nearest bucket (``defaults()`` leaves it open), as diffusers does.

Everything here is plain data and arithmetic; nothing imports torch.distributed or loads weights.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Sequence

from k5.engine.model.config import PRESETS, DiTConfig
from k5.kernels.nabla import NABLA_WINDOW

TASKS = ("t2v", "i2v", "t2i", "i2i")
FAMILIES = ("lite", "pro", "image-lite")
NABLA_WINDOWS = NABLA_WINDOW  # wT, wH, wW of every NABLA config (k5.kernels.nabla)
ORG = "kandinskylab"

# MagCache ratios, verbatim from the configs named in the rows below (cond/uncond interleaved; the reference
# prepends [1, 1]). Nocfg configs have 0 in the unconditional slots, which a run without guidance never reads.
_LITE_SFT_5S = (
    0.91607, 0.91507, 0.95254, 0.95349, 1.04876, 1.04937, 1.0842, 1.084, 1.04372, 1.04445, 1.03521, 1.03559, 1.03906,
    1.03904, 1.03104, 1.03132, 1.03618, 1.03671, 1.02519, 1.02512, 1.02595, 1.02603, 1.02378, 1.02447, 1.02427,
    1.02514, 1.01967, 1.01996, 1.02266, 1.02269, 1.01885, 1.01951, 1.01913, 1.01977, 1.01944, 1.02018, 1.01664,
    1.01707, 1.01682, 1.01723, 1.0155, 1.01611, 1.01998, 1.02022, 1.01194, 1.01244, 1.01626, 1.01555, 1.01611,
    1.01654, 1.01545, 1.01579, 1.01362, 1.01376, 1.01589, 1.01627, 1.01527, 1.01521, 1.01301, 1.01334, 1.01415,
    1.01444, 1.0144, 1.01464, 1.01444, 1.01442, 1.01361, 1.01399, 1.01397, 1.01408, 1.01412, 1.01432, 1.01453,
    1.01454, 1.01341, 1.01342, 1.01317, 1.01342, 1.01018, 1.01051, 1.01278, 1.0128, 1.01021, 1.01037, 1.00809,
    1.00794, 1.00679, 1.00711, 0.99882, 0.99948, 0.98905, 0.98905, 0.9755, 0.97545, 0.93786, 0.93738, 0.84336,
    0.84193,
)
_LITE_SFT_10S = (
    0.92261, 0.92261, 0.95898, 0.95962, 1.04862, 1.04855, 1.0806, 1.08045, 1.04405, 1.0445, 1.03587, 1.03619, 1.03789,
    1.03785, 1.03485, 1.03514, 1.03724, 1.03814, 1.02484, 1.02502, 1.02525, 1.02508, 1.02473, 1.02532, 1.02625,
    1.02706, 1.0197, 1.02011, 1.02326, 1.02324, 1.02081, 1.02116, 1.01993, 1.02047, 1.01979, 1.0205, 1.01823, 1.01852,
    1.01785, 1.01813, 1.01563, 1.01606, 1.02057, 1.02083, 1.01132, 1.01207, 1.02053, 1.01959, 1.01718, 1.01749,
    1.01546, 1.01589, 1.01516, 1.01525, 1.01578, 1.01608, 1.01616, 1.01618, 1.01443, 1.01466, 1.01554, 1.01568,
    1.01494, 1.01515, 1.01567, 1.01572, 1.01418, 1.01458, 1.01601, 1.01618, 1.01491, 1.01508, 1.0162, 1.01625,
    1.01412, 1.01419, 1.01431, 1.01437, 1.0106, 1.0108, 1.01428, 1.01427, 1.01222, 1.01236, 1.00812, 1.00818, 1.00759,
    1.00764, 1.001, 1.00119, 0.98798, 0.98819, 0.9727, 0.97279, 0.93234, 0.93213, 0.83781, 0.83746,
)
_LITE_NOCFG_5S = tuple(x for r in (
    0.8827, 1.14399, 1.08362, 1.06681, 1.05906, 1.03969, 1.03835, 1.03338, 1.031, 1.02616, 1.02654, 1.02322, 1.02078,
    1.02, 1.01673, 1.01353, 1.02175, 1.0156, 1.01616, 1.01557, 1.0131, 1.01264, 1.01378, 1.0147, 1.0109, 1.01178,
    1.01248, 1.0111, 1.0099, 1.01248, 1.00721, 1.01134, 1.00752, 1.00837, 1.00817, 1.00475, 0.99937, 1.01171,
    1.00434, 0.99868, 0.9969, 0.995, 0.98869, 0.98454, 0.97462, 0.95885, 0.93354, 0.88895, 0.78835,
) for x in (r, 0))
_LITE_NOCFG_10S = tuple(x for r in (
    0.8736, 1.12136, 1.07896, 1.06666, 1.06235, 1.03925, 1.04018, 1.0355, 1.0327, 1.02839, 1.02768, 1.02488, 1.02143,
    1.02133, 1.01715, 1.01943, 1.02177, 1.01829, 1.01747, 1.01626, 1.01559, 1.01435, 1.01435, 1.01571, 1.01312,
    1.01338, 1.01437, 1.01211, 1.01237, 1.01356, 1.0101, 1.01194, 1.00898, 1.0091, 1.0108, 1.00705, 1.0018, 1.01209,
    1.00525, 1.00098, 0.99914, 0.99592, 0.99089, 0.98506, 0.97495, 0.9604, 0.93492, 0.89367, 0.79353,
) for x in (r, 0))
_LITE_I2V_5S = (
    0.90524, 0.89864, 0.95225, 0.95382, 1.04828, 1.04658, 1.07989, 1.07921, 1.04345, 1.04345, 1.03547, 1.03589,
    1.03715, 1.03745, 1.02909, 1.02907, 1.03391, 1.03416, 1.02366, 1.02392, 1.02359, 1.02415, 1.02256, 1.02289,
    1.02447, 1.02502, 1.01824, 1.01857, 1.02236, 1.02261, 1.01704, 1.01736, 1.01838, 1.01857, 1.01886, 1.01961,
    1.01619, 1.0169, 1.01655, 1.01702, 1.01477, 1.01545, 1.01926, 1.01981, 1.01145, 1.01227, 1.01276, 1.01308,
    1.01583, 1.01619, 1.01587, 1.01641, 1.01386, 1.01418, 1.01441, 1.01505, 1.01473, 1.01491, 1.01346, 1.01407,
    1.01319, 1.0137, 1.01283, 1.01313, 1.01412, 1.01407, 1.01222, 1.0127, 1.0131, 1.01315, 1.01398, 1.0143, 1.01483,
    1.01498, 1.01158, 1.01176, 1.01342, 1.01365, 1.00893, 1.0095, 1.01223, 1.01237, 1.01005, 1.01045, 1.00694,
    1.00679, 1.00691, 1.00742, 0.99846, 0.99916, 0.98563, 0.98549, 0.97116, 0.97145, 0.93116, 0.93069, 0.83437,
    0.83375,
)
_PRO_T2V_5S_SD = (
    1.05108, 1.05459, 1.03217, 1.02625, 1.02084, 1.01846, 1.03457, 1.03179, 1.00932, 1.00985, 0.99931, 0.9993,
    1.02284, 1.01996, 0.98916, 0.99098, 1.03845, 1.03547, 1.00028, 1.0004, 0.98184, 0.98364, 1.02553, 1.02362,
    0.99988, 0.99932, 1.01271, 1.01285, 1.00014, 1.00077, 0.99271, 0.99318, 1.11646, 1.11503, 0.93333, 0.93057,
    0.98949, 0.99107, 1.00834, 1.00772, 1.00786, 1.00798, 1.00357, 1.00307, 1.02427, 1.02217, 0.99526, 0.99595,
    0.98479, 0.98713, 1.04114, 1.02792, 1.00598, 1.00493, 0.99466, 0.99516, 0.99617, 0.99626, 0.99749, 0.99835,
    1.01384, 1.01141, 1.00413, 1.00386, 1.00521, 1.00832, 0.99833, 0.99848, 0.99242, 0.99254, 1.00186, 1.00105,
    1.00468, 1.00341, 0.98685, 0.98733, 1.00656, 1.00466, 0.98858, 0.98928, 1.01212, 1.00985, 0.98267, 0.98204,
    0.99826, 0.99613, 0.96953, 0.96927, 0.98073, 0.97957, 0.95653, 0.95842, 0.94036, 0.93953, 0.89943, 0.89771,
    0.8026, 0.80511,
)
_PRO_T2V_5S_HD = (
    1.06133, 1.06278, 1.03873, 1.03381, 1.02178, 1.0193, 1.03491, 1.03217, 1.00996, 1.0107, 1.00116, 1.00166,
    1.02416, 1.02113, 0.99041, 0.9923, 1.03965, 1.03658, 1.00088, 1.00101, 0.98248, 0.98433, 1.02611, 1.0244,
    1.00062, 0.99987, 1.01328, 1.01354, 1.00058, 1.00124, 0.99323, 0.99369, 1.11828, 1.11693, 0.93251, 0.92965,
    0.9899, 0.99161, 1.00862, 1.00802, 1.00781, 1.00803, 1.00378, 1.003, 1.02443, 1.02223, 0.99546, 0.99611, 0.98498,
    0.98758, 1.04163, 1.02739, 1.00603, 1.00499, 0.99486, 0.99531, 0.99648, 0.99687, 0.99773, 0.99845, 1.01416,
    1.01168, 1.00427, 1.00404, 1.00567, 1.00861, 0.99845, 0.99858, 0.99266, 0.99283, 1.00193, 1.00096, 1.00457,
    1.00317, 0.98699, 0.98747, 1.00696, 1.00524, 0.98907, 0.98964, 1.01238, 1.00992, 0.98305, 0.98243, 0.99844,
    0.99614, 0.96994, 0.96961, 0.98165, 0.98019, 0.95794, 0.95881, 0.94205, 0.94027, 0.90171, 0.89945, 0.80597,
    0.80726,
)
_PRO_T2V_10S_SD = (
    0.98023, 0.99247, 1.03089, 1.02514, 1.01309, 1.01089, 1.03909, 1.03481, 1.01614, 1.01475, 0.99935, 0.99898,
    1.02636, 1.02427, 1.01073, 1.00992, 1.01095, 1.01107, 0.99695, 0.99739, 0.99787, 0.99773, 1.02732, 1.02448,
    0.99997, 1.00002, 1.00324, 1.00319, 1.01161, 1.01049, 0.98849, 0.99007, 1.10221, 1.10528, 0.94084, 0.93506,
    0.99063, 0.9922, 1.00556, 1.00493, 1.01289, 1.01203, 0.99886, 0.99879, 1.01212, 1.01146, 1.01083, 1.00942,
    0.98618, 0.98824, 1.04545, 1.03401, 0.9971, 0.99662, 1.00007, 0.99974, 0.9939, 0.99448, 1.00796, 1.00782,
    1.00393, 1.00306, 1.00658, 1.00564, 1.01497, 1.01626, 0.98722, 0.99015, 0.99306, 0.99243, 1.00389, 1.00315,
    0.99839, 0.99737, 0.98623, 0.987, 1.00564, 1.00449, 0.99039, 0.99077, 1.01105, 1.00893, 0.98778, 0.98706,
    0.98957, 0.98776, 0.96636, 0.96637, 0.98293, 0.98142, 0.94226, 0.9443, 0.94195, 0.94136, 0.90399, 0.902, 0.82158,
    0.82574,
)
_PRO_T2V_10S_HD = (
    0.98274, 0.99493, 1.03168, 1.02614, 1.01401, 1.01221, 1.03825, 1.03402, 1.01536, 1.01369, 0.99859, 0.99838,
    1.0256, 1.02299, 1.01021, 1.00946, 1.01049, 1.01061, 0.99666, 0.99734, 0.99738, 0.99721, 1.02686, 1.02436,
    0.99975, 1.00001, 1.00307, 1.00302, 1.0112, 1.01022, 0.98854, 0.99003, 1.10228, 1.10421, 0.94015, 0.93541,
    0.99062, 0.99209, 1.00531, 1.00466, 1.0125, 1.01194, 0.99846, 0.99835, 1.01178, 1.01121, 1.0105, 1.00914,
    0.98608, 0.988, 1.04434, 1.03336, 0.99672, 0.99642, 0.99961, 0.99924, 0.99378, 0.99426, 1.00752, 1.00722,
    1.00349, 1.00256, 1.00613, 1.00526, 1.01463, 1.01604, 0.98702, 0.98944, 0.99258, 0.99203, 1.00309, 1.00248,
    0.99763, 0.99656, 0.98566, 0.98628, 1.00527, 1.00374, 0.98961, 0.98984, 1.00967, 1.00762, 0.98694, 0.9865,
    0.98838, 0.9866, 0.96498, 0.9649, 0.98126, 0.98001, 0.94053, 0.94297, 0.94064, 0.93973, 0.90176, 0.89994,
    0.82025, 0.82369,
)
_PRO_I2V_5S_SD = (
    0.95295, 0.96037, 1.11843, 1.10903, 1.01421, 1.01204, 1.01811, 1.01562, 1.01231, 1.01056, 0.9972, 0.99662,
    1.01979, 1.01757, 1.02381, 1.02207, 0.99479, 0.9951, 1.00294, 1.0024, 0.99773, 0.9984, 1.01817, 1.01605, 0.99913,
    0.99944, 0.99218, 0.99299, 1.03239, 1.03021, 0.99568, 0.9951, 1.0124, 1.01201, 0.97933, 0.98116, 1.02511, 1.02369,
    0.98456, 0.98444, 1.01573, 1.01525, 1.01743, 1.01688, 0.99326, 0.99416, 0.99642, 0.99641, 1.03137, 1.0265,
    1.00513, 1.00922, 0.97789, 0.98044, 1.02419, 1.02194, 1.00083, 1.00147, 0.99584, 0.9971, 1.01021, 1.00855,
    1.03171, 1.02869, 0.97483, 0.97822, 1.03725, 1.02688, 1.00433, 1.00196, 0.99005, 0.99085, 1.01196, 1.01015,
    0.99815, 1.00002, 1.00673, 1.00522, 1.00589, 1.00883, 1.00424, 1.00184, 0.9863, 0.98711, 1.00569, 1.00432,
    0.99096, 0.98978, 1.00107, 0.99868, 0.97743, 0.97855, 0.96446, 0.96312, 0.93896, 0.9413, 0.85115, 0.84801,
)
_PRO_I2V_5S_HD = (
    1.03563, 1.03368, 1.04423, 1.03794, 1.00481, 1.00407, 1.0317, 1.02925, 1.03814, 1.03604, 0.99118, 0.99214,
    1.00768, 1.00728, 0.9999, 1.00075, 1.03272, 1.03035, 1.01254, 1.01205, 0.9801, 0.98287, 1.02185, 1.02018,
    0.99365, 0.99368, 1.00572, 1.00619, 1.01411, 1.01344, 1.00445, 1.00438, 1.11448, 1.11342, 0.94186, 0.94065,
    0.99309, 0.99454, 1.0088, 1.00838, 1.00741, 1.00808, 1.00698, 1.00605, 1.01266, 1.01218, 1.0106, 1.00968,
    0.98969, 0.99204, 1.01784, 1.00727, 1.00304, 1.0025, 1.00326, 1.00309, 0.99478, 0.99558, 1.00362, 1.00373,
    1.00801, 1.00714, 1.00184, 1.00202, 1.0099, 1.01111, 0.99854, 0.99918, 0.99393, 0.99442, 1.00183, 1.00176,
    1.00648, 1.00565, 0.98875, 0.98903, 1.00561, 1.00376, 0.99138, 0.9926, 1.01195, 1.01037, 0.97298, 0.97494,
    0.99551, 0.99309, 0.96925, 0.96974, 0.9741, 0.97415, 0.95861, 0.96225, 0.94539, 0.94383, 0.89835, 0.89666,
    0.81038, 0.81322,
)

SD, HD, IMAGE = (512, 768), (768, 1280), (1024, 1024)
IMAGE_SHIFT = 3.0  # the reference image pipelines' scheduler_scale default (module docstring)
FRAMES = {5: 121, 10: 241}
_KC = "kandinskylab/kandinsky-5 configs/"
_AF = "ai-forever/Kandinsky-5 configs/"

# name, task, family, repo (original format), weight file in it, -Diffusers repo or None, steps, guidance,
# NABLA P (None: dense), (height, width), seconds (0: image), MagCache ratios, source.
# Pro SD and HD rows share a repo and its weights; the first row of a repo is what its id alone means.
_ROWS = (
    ("t2v-lite-sft-5s", "t2v", "lite", "T2V-Lite-sft-5s", "kandinsky5lite_t2v_sft_5s", True, 50, 5.0, None, SD, 5,
     _LITE_SFT_5S, "k5_lite_t2v_5s_sft_sd.yaml = " + _AF + "config_5s_sft.yaml (ratios via maybleMyers/kandinsky5)"),
    ("t2v-lite-sft-10s", "t2v", "lite", "T2V-Lite-sft-10s", "kandinsky5lite_t2v_sft_10s", True, 50, 5.0, 0.9, SD, 10,
     _LITE_SFT_10S, _KC + "k5_lite_t2v_10s_sft_sd.yaml"),
    ("t2v-lite-pretrain-5s", "t2v", "lite", "T2V-Lite-pretrain-5s", "kandinsky5lite_t2v_pretrain_5s", True, 50, 5.0,
     None, SD, 5, None, _AF + "config_5s_pretrain.yaml"),
    ("t2v-lite-pretrain-10s", "t2v", "lite", "T2V-Lite-pretrain-10s", "kandinsky5lite_t2v_pretrain_10s", True, 50, 5.0,
     0.9, SD, 10, None, _KC + "k5_lite_t2v_10s_pretrain_sd.yaml"),
    ("t2v-lite-nocfg-5s", "t2v", "lite", "T2V-Lite-nocfg-5s", "kandinsky5lite_t2v_nocfg_5s", True, 50, 1.0, None, SD, 5,
     _LITE_NOCFG_5S, "k5_lite_t2v_5s_nocfg_sd.yaml = " + _AF + "config_5s_nocfg.yaml (ratios via maybleMyers)"),
    # The YAML points at the sft 10 s file (a config typo, architecture note section 9.4); the repo holds nocfg_10s.
    ("t2v-lite-nocfg-10s", "t2v", "lite", "T2V-Lite-nocfg-10s", "kandinsky5lite_t2v_nocfg_10s", True, 50, 1.0, 0.9, SD,
     10, _LITE_NOCFG_10S, _KC + "k5_lite_t2v_10s_nocfg_sd.yaml"),
    ("t2v-lite-distilled16steps-5s", "t2v", "lite", "T2V-Lite-distilled16steps-5s",
     "kandinsky5lite_t2v_distilled16steps_5s", True, 16, 1.0, None, SD, 5, None, _KC + "k5_lite_t2v_5s_distil_sd.yaml"),
    ("t2v-lite-distilled16steps-10s", "t2v", "lite", "T2V-Lite-distilled16steps-10s",
     "kandinsky5lite_t2v_distilled16steps_10s", True, 16, 1.0, 0.9, SD, 10, None,
     _KC + "k5_lite_t2v_10s_distil_sd.yaml"),
    ("i2v-lite-5s", "i2v", "lite", "I2V-Lite-5s", "kandinsky5lite_i2v_5s", False, 50, 5.0, None, SD, 5, _LITE_I2V_5S,
     _KC + "k5_lite_i2v_5s_sft_sd.yaml"),
    ("t2v-pro-sft-5s-hd", "t2v", "pro", "T2V-Pro-sft-5s", "kandinsky5pro_t2v_sft_5s", True, 50, 5.0, 0.8, HD, 5,
     _PRO_T2V_5S_HD, _KC + "k5_pro_t2v_5s_sft_hd.yaml"),
    ("t2v-pro-sft-5s-sd", "t2v", "pro", "T2V-Pro-sft-5s", "kandinsky5pro_t2v_sft_5s", True, 50, 5.0, None, SD, 5,
     _PRO_T2V_5S_SD, _KC + "k5_pro_t2v_5s_sft_sd.yaml"),
    ("t2v-pro-sft-10s-hd", "t2v", "pro", "T2V-Pro-sft-10s", "kandinsky5pro_t2v_sft_10s", False, 50, 5.0, 0.7, HD, 10,
     _PRO_T2V_10S_HD, _KC + "k5_pro_t2v_10s_sft_hd.yaml"),
    ("t2v-pro-sft-10s-sd", "t2v", "pro", "T2V-Pro-sft-10s", "kandinsky5pro_t2v_sft_10s", False, 50, 5.0, 0.9, SD, 10,
     _PRO_T2V_10S_SD, _KC + "k5_pro_t2v_10s_sft_sd.yaml"),
    ("i2v-pro-sft-5s-hd", "i2v", "pro", "I2V-Pro-sft-5s", "kandinsky5pro_i2v_sft_5s", True, 50, 5.0, 0.8, HD, 5,
     _PRO_I2V_5S_HD, _KC + "k5_pro_i2v_5s_sft_hd.yaml"),
    ("i2v-pro-sft-5s-sd", "i2v", "pro", "I2V-Pro-sft-5s", "kandinsky5pro_i2v_sft_5s", True, 50, 5.0, None, SD, 5,
     _PRO_I2V_5S_SD, _KC + "k5_pro_i2v_5s_sft_sd.yaml"),
    ("t2v-pro-pretrain-5s-hd", "t2v", "pro", "T2V-Pro-pretrain-5s", "kandinsky5pro_t2v_pretrain_5s", False, 50, 5.0,
     0.8, HD, 5, None, "README model zoo (no config): " + _KC + "k5_pro_t2v_5s_sft_hd.yaml"),
    ("t2v-pro-pretrain-5s-sd", "t2v", "pro", "T2V-Pro-pretrain-5s", "kandinsky5pro_t2v_pretrain_5s", False, 50, 5.0,
     None, SD, 5, None, "README model zoo (no config): " + _KC + "k5_pro_t2v_5s_sft_sd.yaml"),
    ("t2v-pro-pretrain-10s-hd", "t2v", "pro", "T2V-Pro-pretrain-10s", "kandinsky5pro_t2v_pretrain_10s", False, 50,
     5.0, 0.7, HD, 10, None, "README model zoo (no config): " + _KC + "k5_pro_t2v_10s_sft_hd.yaml"),
    ("t2v-pro-pretrain-10s-sd", "t2v", "pro", "T2V-Pro-pretrain-10s", "kandinsky5pro_t2v_pretrain_10s", False, 50,
     5.0, 0.9, SD, 10, None, "README model zoo (no config): " + _KC + "k5_pro_t2v_10s_sft_sd.yaml"),
    # Image Lite: config_t2i.yaml / config_i2i.yaml (module docstring); pretrain repos have no config (README: "-").
    ("t2i-lite-sft", "t2i", "image-lite", "T2I-Lite", "kandinsky5lite_t2i", "T2I-Lite-sft", 50, 3.5, None, IMAGE, 0,
     None, _KC + "config_t2i.yaml"),
    ("t2i-lite-pretrain", "t2i", "image-lite", "T2I-Lite-pretrain", "kandinsky5lite_t2i_pretrain", "T2I-Lite-pretrain",
     50, 3.5, None, IMAGE, 0, None, "README model zoo (no config): " + _KC + "config_t2i.yaml"),
    ("i2i-lite-sft", "i2i", "image-lite", "I2I-Lite", "kandinsky5lite_i2i", "I2I-Lite-sft", 50, 3.5, None, IMAGE, 0,
     None, _KC + "config_i2i.yaml@57bcb40 (= maybleMyers/kandinsky5@0254232)"),
    ("i2i-lite-pretrain", "i2i", "image-lite", "I2I-Lite-pretrain", "kandinsky5lite_i2i_pretrain", "I2I-Lite-pretrain",
     50, 3.5, None, IMAGE, 0, None, "README model zoo (no config): " + _KC + "config_i2i.yaml@57bcb40"),
)


@dataclass(frozen=True)
class Variant:
    name: str
    task: str  # t2v | i2v | t2i | i2i
    family: str  # lite | pro | image-lite: the DiT shapes its weights have
    repo: str  # Hugging Face repo id of the original-format release (model/<weights>.safetensors)
    weights: str  # path of the single-file checkpoint inside ``repo``
    diffusers_repo: str | None  # the -Diffusers repo id, where one is released
    steps: int
    guidance_scale: float
    shift: float | None  # None: the checkpoint's scheduler config
    nabla_P: float | None  # None: dense attention
    height: int
    width: int
    num_frames: int
    mag_ratios: tuple[float, ...] | None
    source: str

    @property
    def attention(self) -> str:
        return "dense" if self.nabla_P is None else "nabla"

    @property
    def nabla_windows(self) -> tuple[int, int, int] | None:
        return None if self.nabla_P is None else NABLA_WINDOWS

    @property
    def rope_scale(self) -> tuple[float, float, float]:
        """The config's ``metrics.scale_factor`` (the RoPE position divisor of its resolution bucket)."""
        if self.family == "image-lite":
            return (1.0, 1.0, 1.0)
        return (1.0, 2.0, 2.0) if (self.height, self.width) == SD else (1.0, 3.16, 3.16)

    @property
    def repos(self) -> tuple[str, ...]:
        return (self.repo,) + ((self.diffusers_repo,) if self.diffusers_repo else ())

    def sampling(self) -> dict:
        """The settings a tiny model takes from a variant: steps, guidance, shift (MagCache: ``mag_ratios``)."""
        return {"steps": self.steps, "guidance_scale": self.guidance_scale, "shift": self.shift}

    def defaults(self) -> dict:
        """Request defaults of a real checkpoint: sampling settings plus size and frames (an engine.pipelines.video.Request's
        fields; an image variant's are an engine.pipelines.image_request.ImageRequest's: no frames). An edit (i2i) leaves the size
        open: it follows the source image (its nearest bucket); ``height`` x ``width`` is the size without one."""
        if self.family == "image-lite":
            open_size = self.task == "i2i"
            return {**self.sampling(), "height": None if open_size else self.height,
                    "width": None if open_size else self.width}
        return {**self.sampling(), "height": self.height, "width": self.width, "num_frames": self.num_frames}

    def configure(self, config: DiTConfig) -> DiTConfig:
        """``config`` with this variant's attention: what a single-file checkpoint (no config) runs with."""
        if self.nabla_P is None:
            return config.replace(attention_type="regular", attention_P=None, attention_wT=None, attention_wH=None,
                                  attention_wW=None)
        wT, wH, wW = NABLA_WINDOWS
        return config.replace(attention_type="nabla", attention_P=self.nabla_P, attention_wT=wT, attention_wH=wH,
                              attention_wW=wW)


def _variant(row) -> Variant:
    name, task, family, repo, weights, diffusers, steps, guidance, P, (h, w), seconds, ratios, source = row
    if diffusers is True:
        diffusers = repo
    video = seconds > 0
    return Variant(
        name=name, task=task, family=family, repo=f"{ORG}/Kandinsky-5.0-{repo}", weights=f"model/{weights}.safetensors",
        diffusers_repo=f"{ORG}/Kandinsky-5.0-{diffusers}-Diffusers" if diffusers else None, steps=steps,
        guidance_scale=guidance, shift=5.0 if video else IMAGE_SHIFT, nabla_P=P, height=h, width=w,
        num_frames=FRAMES[seconds] if video else 1, mag_ratios=ratios, source=source,
    )


VARIANTS: dict[str, Variant] = {row[0]: _variant(row) for row in _ROWS}


class VariantError(ValueError):
    """A variant that does not exist, does not fit the checkpoint, or cannot do what was asked."""


def get(name: str) -> Variant:
    """The variant called ``name``; an unknown name is an error listing the closest names."""
    key = name.strip().lower()
    if key in VARIANTS:
        return VARIANTS[key]
    close = difflib.get_close_matches(key, VARIANTS, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see --list-variants"
    raise VariantError(f"unknown variant {name!r}; {hint}")


def _repo_key(text: str) -> str:
    # "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers", "models--org--name" (the HF cache folder) or a
    # folder path ending in the repo name: compare the repo name alone, case-insensitively, without the org.
    base = re.split(r"[\\/]", text.rstrip("/\\"))[-1]
    if base.startswith("models--"):
        base = base.split("--")[-1]
    return base.lower()


_BY_REPO: dict[str, str] = {}
for _v in VARIANTS.values():
    for _r in _v.repos:
        _BY_REPO.setdefault(_repo_key(_r), _v.name)  # first row of a repo: SD/HD repos mean HD


def recognise(text: str) -> Variant | None:
    """The variant a repo id, HF cache folder or local folder name means (its default for a shared repo), if any.

    Repo ids of the ai-forever/ organisation (the first Lite releases) are the same repos and match too.
    """
    name = _BY_REPO.get(_repo_key(text))
    return VARIANTS[name] if name else None


def family_of(config: DiTConfig) -> str | None:
    """Which released DiT the config's shapes are (None: none of them, e.g. the tiny model)."""
    for family, preset in (("lite", PRESETS["lite"]), ("pro", PRESETS["pro"]), ("image-lite", PRESETS["image-lite"])):
        if (config.model_dim, config.ff_dim, config.num_text_blocks, config.num_visual_blocks, config.axes_dims) == (
                preset.model_dim, preset.ff_dim, preset.num_text_blocks, preset.num_visual_blocks, preset.axes_dims):
            return family
    return None


def _shape(config: DiTConfig) -> str:
    return (f"model_dim {config.model_dim}, {config.num_visual_blocks} visual blocks, "
            f"{config.num_heads} heads of {config.head_dim}")


def check_fits(variant: Variant, config: DiTConfig, where: str = "the checkpoint") -> None:
    """Raise VariantError if ``variant`` is for other weights than ``config`` describes."""
    family = family_of(config)
    if family == variant.family:
        return
    fitting = [v.name for v in VARIANTS.values() if v.family == family]
    have = f"{family} weights" if family else "weights of no released shape"
    hint = f"; variants for these weights: {', '.join(fitting)}" if fitting else ""
    raise VariantError(
        f"variant {variant.name} is for Kandinsky 5 {variant.family} weights ({_shape(PRESETS[variant.family])}), "
        f"but {where} has {have} ({_shape(config)}){hint}"
    )


def check_task(variant: Variant, tasks: Sequence[str], what: str = "this model") -> None:
    """Raise VariantError unless the variant's task is one ``what`` can run (the tiny models: any of their task)."""
    if variant.task not in tasks:
        fitting = [v.name for v in VARIANTS.values() if v.task in tasks]
        raise VariantError(f"variant {variant.name} is a {variant.task} model; {what} runs {'/'.join(tasks)}: "
                           f"use one of {', '.join(fitting)}")


def check_magcache(variant: Variant) -> tuple[float, ...]:
    """The variant's MagCache ratios; a variant without them is an error naming those that have them."""
    if variant.mag_ratios is None:
        have = [v.name for v in VARIANTS.values() if v.mag_ratios is not None and v.task == variant.task]
        raise VariantError(
            f"variant {variant.name} has no MagCache ratios in the reference configs (MagCache is calibrated per "
            f"checkpoint; the reference ships ratios for sft and nocfg models): drop --magcache, or use one of "
            f"{', '.join(have)}"
        )
    return variant.mag_ratios
