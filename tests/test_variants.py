"""The catalogue against the reference configs, written out here from the reference files (not from our table).

Each REFERENCE entry is the relevant part of one YAML file of kandinskylab/kandinsky-5 (configs/, commit ae7d348
unless named) or, for the Lite 5 s configs that the kandinskylab index does not hold, of ai-forever/Kandinsky-5
configs/ (ratios as mirrored by maybleMyers/kandinsky5@de7cd93). Values outside the YAML, from the reference's
test.py and README: shift = test.py's --scheduler_scale default 5.0 (the YAML scheduler_scale is read by no code);
frames = time_length * 24 // 4 latent steps -> 121 / 241; size: test.py's 512x768 default, the HD commands'
--width 1280 --height 768 (examples/examples.sh).
"""

import re

import pytest
import torch
import yaml

from k5.parallel import memory
from k5.engine.catalogue import variants as V
from k5.launch import catalogue
from k5.engine.model.config import PRESETS
from k5.parallel.plan import recommended_layout
from k5.parallel.memory import Shape, dit_activation_bytes

REFERENCE = {
    "k5_lite_t2v_10s_sft_sd.yaml": """
metrics:
  scheduler_scale: 10
  scale_factor:
  - 1.0
  - 2.0
  - 2.0
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5lite_t2v_sft_10s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention:
    type: nabla
    P: 0.9
    wT: 11
    wW: 3
    wH: 3
magcache:
  mag_ratios: [0.92261, 0.92261, 0.95898, 0.95962, 1.04862, 1.04855, 1.0806, 1.08045, 1.04405, 1.0445, 1.03587, 1.03619, 1.03789, 1.03785, 1.03485, 1.03514, 1.03724, 1.03814, 1.02484, 1.02502, 1.02525, 1.02508, 1.02473, 1.02532, 1.02625, 1.02706, 1.0197, 1.02011, 1.02326, 1.02324, 1.02081, 1.02116, 1.01993, 1.02047, 1.01979, 1.0205, 1.01823, 1.01852, 1.01785, 1.01813, 1.01563, 1.01606, 1.02057, 1.02083, 1.01132, 1.01207, 1.02053, 1.01959, 1.01718, 1.01749, 1.01546, 1.01589, 1.01516, 1.01525, 1.01578, 1.01608, 1.01616, 1.01618, 1.01443, 1.01466, 1.01554, 1.01568, 1.01494, 1.01515, 1.01567, 1.01572, 1.01418, 1.01458, 1.01601, 1.01618, 1.01491, 1.01508, 1.0162, 1.01625, 1.01412, 1.01419, 1.01431, 1.01437, 1.0106, 1.0108, 1.01428, 1.01427, 1.01222, 1.01236, 1.00812, 1.00818, 1.00759, 1.00764, 1.001, 1.00119, 0.98798, 0.98819, 0.9727, 0.97279, 0.93234, 0.93213, 0.83781, 0.83746]
""",
    "k5_lite_t2v_10s_distil_sd.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5lite_t2v_distilled16steps_10s.safetensors"
  num_steps: 16
  guidance_weight: 1.0
  attention: {type: nabla, P: 0.9, wT: 11, wW: 3, wH: 3}
""",
    "k5_lite_t2v_10s_nocfg_sd.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5lite_t2v_sft_10s.safetensors"
  num_steps: 50
  guidance_weight: 1.0
  attention: {type: nabla, P: 0.9, wT: 11, wW: 3, wH: 3}
magcache:
  mag_ratios: [0.8736, 0, 1.12136, 0, 1.07896, 0, 1.06666, 0, 1.06235, 0, 1.03925, 0, 1.04018, 0, 1.0355, 0, 1.0327, 0, 1.02839, 0, 1.02768, 0, 1.02488, 0, 1.02143, 0, 1.02133, 0, 1.01715, 0, 1.01943, 0, 1.02177, 0, 1.01829, 0, 1.01747, 0, 1.01626, 0, 1.01559, 0, 1.01435, 0, 1.01435, 0, 1.01571, 0, 1.01312, 0, 1.01338, 0, 1.01437, 0, 1.01211, 0, 1.01237, 0, 1.01356, 0, 1.0101, 0, 1.01194, 0, 1.00898, 0, 1.0091, 0, 1.0108, 0, 1.00705, 0, 1.0018, 0, 1.01209, 0, 1.00525, 0, 1.00098, 0, 0.99914, 0, 0.99592, 0, 0.99089, 0, 0.98506, 0, 0.97495, 0, 0.9604, 0, 0.93492, 0, 0.89367, 0, 0.79353, 0]
""",
    "k5_lite_t2v_10s_pretrain_sd.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5lite_t2v_pretrain_10s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention: {type: nabla, P: 0.9, wT: 11, wW: 3, wH: 3}
""",
    "k5_lite_t2v_5s_distil_sd.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5lite_t2v_distilled16steps_5s.safetensors"
  num_steps: 16
  guidance_weight: 1.0
  attention: {type: flash}
""",
    "k5_lite_i2v_5s_sft_sd.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5lite_i2v_5s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention: {type: flash}
magcache:
  mag_ratios: [0.90524, 0.89864, 0.95225, 0.95382, 1.04828, 1.04658, 1.07989, 1.07921, 1.04345, 1.04345, 1.03547, 1.03589, 1.03715, 1.03745, 1.02909, 1.02907, 1.03391, 1.03416, 1.02366, 1.02392, 1.02359, 1.02415, 1.02256, 1.02289, 1.02447, 1.02502, 1.01824, 1.01857, 1.02236, 1.02261, 1.01704, 1.01736, 1.01838, 1.01857, 1.01886, 1.01961, 1.01619, 1.0169, 1.01655, 1.01702, 1.01477, 1.01545, 1.01926, 1.01981, 1.01145, 1.01227, 1.01276, 1.01308, 1.01583, 1.01619, 1.01587, 1.01641, 1.01386, 1.01418, 1.01441, 1.01505, 1.01473, 1.01491, 1.01346, 1.01407, 1.01319, 1.0137, 1.01283, 1.01313, 1.01412, 1.01407, 1.01222, 1.0127, 1.0131, 1.01315, 1.01398, 1.0143, 1.01483, 1.01498, 1.01158, 1.01176, 1.01342, 1.01365, 1.00893, 1.0095, 1.01223, 1.01237, 1.01005, 1.01045, 1.00694, 1.00679, 1.00691, 1.00742, 0.99846, 0.99916, 0.98563, 0.98549, 0.97116, 0.97145, 0.93116, 0.93069, 0.83437, 0.83375]
""",
    "k5_pro_t2v_5s_sft_sd.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5pro_t2v_sft_5s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention: {type: flash}
magcache:
  mag_ratios: [1.05108, 1.05459, 1.03217, 1.02625, 1.02084, 1.01846, 1.03457, 1.03179, 1.00932, 1.00985, 0.99931, 0.9993, 1.02284, 1.01996, 0.98916, 0.99098, 1.03845, 1.03547, 1.00028, 1.0004, 0.98184, 0.98364, 1.02553, 1.02362, 0.99988, 0.99932, 1.01271, 1.01285, 1.00014, 1.00077, 0.99271, 0.99318, 1.11646, 1.11503, 0.93333, 0.93057, 0.98949, 0.99107, 1.00834, 1.00772, 1.00786, 1.00798, 1.00357, 1.00307, 1.02427, 1.02217, 0.99526, 0.99595, 0.98479, 0.98713, 1.04114, 1.02792, 1.00598, 1.00493, 0.99466, 0.99516, 0.99617, 0.99626, 0.99749, 0.99835, 1.01384, 1.01141, 1.00413, 1.00386, 1.00521, 1.00832, 0.99833, 0.99848, 0.99242, 0.99254, 1.00186, 1.00105, 1.00468, 1.00341, 0.98685, 0.98733, 1.00656, 1.00466, 0.98858, 0.98928, 1.01212, 1.00985, 0.98267, 0.98204, 0.99826, 0.99613, 0.96953, 0.96927, 0.98073, 0.97957, 0.95653, 0.95842, 0.94036, 0.93953, 0.89943, 0.89771, 0.8026, 0.80511]
""",
    "k5_pro_t2v_5s_sft_hd.yaml": """
metrics:
  scale_factor: [1.0, 3.16, 3.16]
  resolution: 1024
model:
  checkpoint_path: "./weights/model/kandinsky5pro_t2v_sft_5s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention: {type: nabla, method: topcdf, P: 0.8, add_sta: true, wT: 11, wW: 3, wH: 3}
magcache:
  mag_ratios: [1.06133, 1.06278, 1.03873, 1.03381, 1.02178, 1.0193, 1.03491, 1.03217, 1.00996, 1.0107, 1.00116, 1.00166, 1.02416, 1.02113, 0.99041, 0.9923, 1.03965, 1.03658, 1.00088, 1.00101, 0.98248, 0.98433, 1.02611, 1.0244, 1.00062, 0.99987, 1.01328, 1.01354, 1.00058, 1.00124, 0.99323, 0.99369, 1.11828, 1.11693, 0.93251, 0.92965, 0.9899, 0.99161, 1.00862, 1.00802, 1.00781, 1.00803, 1.00378, 1.003, 1.02443, 1.02223, 0.99546, 0.99611, 0.98498, 0.98758, 1.04163, 1.02739, 1.00603, 1.00499, 0.99486, 0.99531, 0.99648, 0.99687, 0.99773, 0.99845, 1.01416, 1.01168, 1.00427, 1.00404, 1.00567, 1.00861, 0.99845, 0.99858, 0.99266, 0.99283, 1.00193, 1.00096, 1.00457, 1.00317, 0.98699, 0.98747, 1.00696, 1.00524, 0.98907, 0.98964, 1.01238, 1.00992, 0.98305, 0.98243, 0.99844, 0.99614, 0.96994, 0.96961, 0.98165, 0.98019, 0.95794, 0.95881, 0.94205, 0.94027, 0.90171, 0.89945, 0.80597, 0.80726]
""",
    "k5_pro_t2v_10s_sft_sd.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5pro_t2v_sft_10s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention: {type: nabla, method: topcdf, P: 0.9, add_sta: true, wT: 11, wW: 3, wH: 3}
magcache:
  mag_ratios: [0.98023, 0.99247, 1.03089, 1.02514, 1.01309, 1.01089, 1.03909, 1.03481, 1.01614, 1.01475, 0.99935, 0.99898, 1.02636, 1.02427, 1.01073, 1.00992, 1.01095, 1.01107, 0.99695, 0.99739, 0.99787, 0.99773, 1.02732, 1.02448, 0.99997, 1.00002, 1.00324, 1.00319, 1.01161, 1.01049, 0.98849, 0.99007, 1.10221, 1.10528, 0.94084, 0.93506, 0.99063, 0.9922, 1.00556, 1.00493, 1.01289, 1.01203, 0.99886, 0.99879, 1.01212, 1.01146, 1.01083, 1.00942, 0.98618, 0.98824, 1.04545, 1.03401, 0.9971, 0.99662, 1.00007, 0.99974, 0.9939, 0.99448, 1.00796, 1.00782, 1.00393, 1.00306, 1.00658, 1.00564, 1.01497, 1.01626, 0.98722, 0.99015, 0.99306, 0.99243, 1.00389, 1.00315, 0.99839, 0.99737, 0.98623, 0.987, 1.00564, 1.00449, 0.99039, 0.99077, 1.01105, 1.00893, 0.98778, 0.98706, 0.98957, 0.98776, 0.96636, 0.96637, 0.98293, 0.98142, 0.94226, 0.9443, 0.94195, 0.94136, 0.90399, 0.902, 0.82158, 0.82574]
""",
    "k5_pro_t2v_10s_sft_hd.yaml": """
metrics:
  scale_factor: [1.0, 3.16, 3.16]
  resolution: 1024
model:
  checkpoint_path: "./weights/model/kandinsky5pro_t2v_sft_10s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention: {type: nabla, method: topcdf, P: 0.7, add_sta: true, wT: 11, wW: 3, wH: 3}
magcache:
  mag_ratios: [0.98274, 0.99493, 1.03168, 1.02614, 1.01401, 1.01221, 1.03825, 1.03402, 1.01536, 1.01369, 0.99859, 0.99838, 1.0256, 1.02299, 1.01021, 1.00946, 1.01049, 1.01061, 0.99666, 0.99734, 0.99738, 0.99721, 1.02686, 1.02436, 0.99975, 1.00001, 1.00307, 1.00302, 1.0112, 1.01022, 0.98854, 0.99003, 1.10228, 1.10421, 0.94015, 0.93541, 0.99062, 0.99209, 1.00531, 1.00466, 1.0125, 1.01194, 0.99846, 0.99835, 1.01178, 1.01121, 1.0105, 1.00914, 0.98608, 0.988, 1.04434, 1.03336, 0.99672, 0.99642, 0.99961, 0.99924, 0.99378, 0.99426, 1.00752, 1.00722, 1.00349, 1.00256, 1.00613, 1.00526, 1.01463, 1.01604, 0.98702, 0.98944, 0.99258, 0.99203, 1.00309, 1.00248, 0.99763, 0.99656, 0.98566, 0.98628, 1.00527, 1.00374, 0.98961, 0.98984, 1.00967, 1.00762, 0.98694, 0.9865, 0.98838, 0.9866, 0.96498, 0.9649, 0.98126, 0.98001, 0.94053, 0.94297, 0.94064, 0.93973, 0.90176, 0.89994, 0.82025, 0.82369]
""",
    "k5_pro_i2v_5s_sft_sd.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5pro_i2v_sft_5s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention: {type: flash}
magcache:
  mag_ratios: [0.95295, 0.96037, 1.11843, 1.10903, 1.01421, 1.01204, 1.01811, 1.01562, 1.01231, 1.01056, 0.9972, 0.99662, 1.01979, 1.01757, 1.02381, 1.02207, 0.99479, 0.9951, 1.00294, 1.0024, 0.99773, 0.9984, 1.01817, 1.01605, 0.99913, 0.99944, 0.99218, 0.99299, 1.03239, 1.03021, 0.99568, 0.9951, 1.0124, 1.01201, 0.97933, 0.98116, 1.02511, 1.02369, 0.98456, 0.98444, 1.01573, 1.01525, 1.01743, 1.01688, 0.99326, 0.99416, 0.99642, 0.99641, 1.03137, 1.0265, 1.00513, 1.00922, 0.97789, 0.98044, 1.02419, 1.02194, 1.00083, 1.00147, 0.99584, 0.9971, 1.01021, 1.00855, 1.03171, 1.02869, 0.97483, 0.97822, 1.03725, 1.02688, 1.00433, 1.00196, 0.99005, 0.99085, 1.01196, 1.01015, 0.99815, 1.00002, 1.00673, 1.00522, 1.00589, 1.00883, 1.00424, 1.00184, 0.9863, 0.98711, 1.00569, 1.00432, 0.99096, 0.98978, 1.00107, 0.99868, 0.97743, 0.97855, 0.96446, 0.96312, 0.93896, 0.9413, 0.85115, 0.84801]
""",
    "k5_pro_i2v_5s_sft_hd.yaml": """
metrics:
  scale_factor: [1.0, 3.16, 3.16]
  resolution: 1024
model:
  checkpoint_path: "./weights/model/kandinsky5pro_i2v_sft_5s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention: {type: nabla, method: topcdf, P: 0.8, add_sta: true, wT: 11, wW: 3, wH: 3}
magcache:
  mag_ratios: [1.03563, 1.03368, 1.04423, 1.03794, 1.00481, 1.00407, 1.0317, 1.02925, 1.03814, 1.03604, 0.99118, 0.99214, 1.00768, 1.00728, 0.9999, 1.00075, 1.03272, 1.03035, 1.01254, 1.01205, 0.9801, 0.98287, 1.02185, 1.02018, 0.99365, 0.99368, 1.00572, 1.00619, 1.01411, 1.01344, 1.00445, 1.00438, 1.11448, 1.11342, 0.94186, 0.94065, 0.99309, 0.99454, 1.0088, 1.00838, 1.00741, 1.00808, 1.00698, 1.00605, 1.01266, 1.01218, 1.0106, 1.00968, 0.98969, 0.99204, 1.01784, 1.00727, 1.00304, 1.0025, 1.00326, 1.00309, 0.99478, 0.99558, 1.00362, 1.00373, 1.00801, 1.00714, 1.00184, 1.00202, 1.0099, 1.01111, 0.99854, 0.99918, 0.99393, 0.99442, 1.00183, 1.00176, 1.00648, 1.00565, 0.98875, 0.98903, 1.00561, 1.00376, 0.99138, 0.9926, 1.01195, 1.01037, 0.97298, 0.97494, 0.99551, 0.99309, 0.96925, 0.96974, 0.9741, 0.97415, 0.95861, 0.96225, 0.94539, 0.94383, 0.89835, 0.89666, 0.81038, 0.81322]
""",
    # ai-forever/Kandinsky-5 configs/config_5s_sft.yaml (= kandinskylab k5_lite_t2v_5s_sft_sd.yaml), its MagCache
    # ratios as mirrored in maybleMyers/kandinsky5@de7cd93
    "config_5s_sft.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5lite_t2v_sft_5s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention: {type: flash}
magcache:
  mag_ratios: [0.91607, 0.91507, 0.95254, 0.95349, 1.04876, 1.04937, 1.0842, 1.084, 1.04372, 1.04445, 1.03521, 1.03559, 1.03906, 1.03904, 1.03104, 1.03132, 1.03618, 1.03671, 1.02519, 1.02512, 1.02595, 1.02603, 1.02378, 1.02447, 1.02427, 1.02514, 1.01967, 1.01996, 1.02266, 1.02269, 1.01885, 1.01951, 1.01913, 1.01977, 1.01944, 1.02018, 1.01664, 1.01707, 1.01682, 1.01723, 1.0155, 1.01611, 1.01998, 1.02022, 1.01194, 1.01244, 1.01626, 1.01555, 1.01611, 1.01654, 1.01545, 1.01579, 1.01362, 1.01376, 1.01589, 1.01627, 1.01527, 1.01521, 1.01301, 1.01334, 1.01415, 1.01444, 1.0144, 1.01464, 1.01444, 1.01442, 1.01361, 1.01399, 1.01397, 1.01408, 1.01412, 1.01432, 1.01453, 1.01454, 1.01341, 1.01342, 1.01317, 1.01342, 1.01018, 1.01051, 1.01278, 1.0128, 1.01021, 1.01037, 1.00809, 1.00794, 1.00679, 1.00711, 0.99882, 0.99948, 0.98905, 0.98905, 0.9755, 0.97545, 0.93786, 0.93738, 0.84336, 0.84193]
""",
    "config_5s_nocfg.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/kandinsky5lite_t2v_nocfg_5s.safetensors"
  num_steps: 50
  guidance_weight: 1.0
  attention: {type: flash}
magcache:
  mag_ratios: [0.8827, 0, 1.14399, 0, 1.08362, 0, 1.06681, 0, 1.05906, 0, 1.03969, 0, 1.03835, 0, 1.03338, 0, 1.031, 0, 1.02616, 0, 1.02654, 0, 1.02322, 0, 1.02078, 0, 1.02, 0, 1.01673, 0, 1.01353, 0, 1.02175, 0, 1.0156, 0, 1.01616, 0, 1.01557, 0, 1.0131, 0, 1.01264, 0, 1.01378, 0, 1.0147, 0, 1.0109, 0, 1.01178, 0, 1.01248, 0, 1.0111, 0, 1.0099, 0, 1.01248, 0, 1.00721, 0, 1.01134, 0, 1.00752, 0, 1.00837, 0, 1.00817, 0, 1.00475, 0, 0.99937, 0, 1.01171, 0, 1.00434, 0, 0.99868, 0, 0.9969, 0, 0.995, 0, 0.98869, 0, 0.98454, 0, 0.97462, 0, 0.95885, 0, 0.93354, 0, 0.88895, 0, 0.78835, 0]
""",
    "config_5s_pretrain.yaml": """
metrics:
  scale_factor: [1.0, 2.0, 2.0]
  resolution: 512
model:
  checkpoint_path: "./weights/model/lite_pretrain_5s.safetensors"
  num_steps: 50
  guidance_weight: 5.0
  attention: {type: flash}
""",
    "config_t2i.yaml": """
metrics:
  scale_factor: [1.0, 1.0, 1.0]
  resolution: 1024
model:
  checkpoint_path: "./weights/model/kandinsky5lite_t2i.safetensors"
  num_steps: 50
  guidance_weight: 3.5
  attention: {type: flash}
""",
    # kandinskylab configs/config_i2i.yaml@57bcb40 names "kandinsky5lite_t2i.safetensors" here (copied from the t2i
    # config; its other stored version, 116a145, also has guidance_weight 5.0); the mirror's later copy below has the
    # I2I file of get_I2I_pipeline and guidance 3.5, as 57bcb40 and diffusers' Kandinsky5I2IPipeline.
    "config_i2i.yaml (maybleMyers/kandinsky5@0254232)": """
metrics:
  scale_factor: [1.0, 1.0, 1.0]
  resolution: 1024
model:
  checkpoint_path: "./weights/model/kandinsky5lite_i2i.safetensors"
  num_steps: 50
  guidance_weight: 3.5
  dit_params: {instruct_type: "channel", in_visual_dim: 16, model_dim: 2560, num_visual_blocks: 50}
  attention: {type: flash}
""",
}

# Outside the image YAMLs (kandinskylab/kandinsky-5 @116a145): kandinsky/utils.py get_T2I_pipeline / get_I2I_pipeline
# download model_name's "model/<wieghts_name>"; the README model zoo lists the pretrain repos; t2i_pipeline.py and
# i2i_pipeline.py __call__ default to width=1024, height=1024, scheduler_scale=3.0.
IMAGE_REPOS = {
    "t2i-lite-sft": ("kandinskylab/Kandinsky-5.0-T2I-Lite", "kandinsky5lite_t2i.safetensors"),
    "i2i-lite-sft": ("kandinskylab/Kandinsky-5.0-I2I-Lite", "kandinsky5lite_i2i.safetensors"),
    "t2i-lite-pretrain": ("kandinskylab/Kandinsky-5.0-T2I-Lite-pretrain", None),  # file name in no reference file
    "i2i-lite-pretrain": ("kandinskylab/Kandinsky-5.0-I2I-Lite-pretrain", None),
}
IMAGE_CALL_DEFAULTS = {"width": 1024, "height": 1024, "scheduler_scale": 3.0}

# variant -> (reference file, seconds). Pro pretrain and Image Lite pretrain have no config of their own (README
# model zoo: "-", same NFE as sft): they take the sft config of their duration and resolution, without ratios.
EXPECTED = {
    "t2v-lite-sft-5s": ("config_5s_sft.yaml", 5),
    "t2v-lite-sft-10s": ("k5_lite_t2v_10s_sft_sd.yaml", 10),
    "t2v-lite-pretrain-5s": ("config_5s_pretrain.yaml", 5),
    "t2v-lite-pretrain-10s": ("k5_lite_t2v_10s_pretrain_sd.yaml", 10),
    "t2v-lite-nocfg-5s": ("config_5s_nocfg.yaml", 5),
    "t2v-lite-nocfg-10s": ("k5_lite_t2v_10s_nocfg_sd.yaml", 10),
    "t2v-lite-distilled16steps-5s": ("k5_lite_t2v_5s_distil_sd.yaml", 5),
    "t2v-lite-distilled16steps-10s": ("k5_lite_t2v_10s_distil_sd.yaml", 10),
    "i2v-lite-5s": ("k5_lite_i2v_5s_sft_sd.yaml", 5),
    "t2v-pro-sft-5s-sd": ("k5_pro_t2v_5s_sft_sd.yaml", 5),
    "t2v-pro-sft-5s-hd": ("k5_pro_t2v_5s_sft_hd.yaml", 5),
    "t2v-pro-sft-10s-sd": ("k5_pro_t2v_10s_sft_sd.yaml", 10),
    "t2v-pro-sft-10s-hd": ("k5_pro_t2v_10s_sft_hd.yaml", 10),
    "i2v-pro-sft-5s-sd": ("k5_pro_i2v_5s_sft_sd.yaml", 5),
    "i2v-pro-sft-5s-hd": ("k5_pro_i2v_5s_sft_hd.yaml", 5),
    "t2v-pro-pretrain-5s-sd": ("k5_pro_t2v_5s_sft_sd.yaml", 5),
    "t2v-pro-pretrain-5s-hd": ("k5_pro_t2v_5s_sft_hd.yaml", 5),
    "t2v-pro-pretrain-10s-sd": ("k5_pro_t2v_10s_sft_sd.yaml", 10),
    "t2v-pro-pretrain-10s-hd": ("k5_pro_t2v_10s_sft_hd.yaml", 10),
    "t2i-lite-sft": ("config_t2i.yaml", 0),
    "t2i-lite-pretrain": ("config_t2i.yaml", 0),
    "i2i-lite-sft": ("config_i2i.yaml (maybleMyers/kandinsky5@0254232)", 0),
    "i2i-lite-pretrain": ("config_i2i.yaml (maybleMyers/kandinsky5@0254232)", 0),
}
NO_OWN_CONFIG = {"t2v-pro-pretrain-5s-sd", "t2v-pro-pretrain-5s-hd", "t2v-pro-pretrain-10s-sd",
                 "t2v-pro-pretrain-10s-hd", "t2i-lite-pretrain", "i2i-lite-pretrain"}
SIZE = {512: (512, 768), 1024: (768, 1280)}  # test.py default; examples.sh HD commands (--width 1280 --height 768)


def test_every_variant_has_a_reference_and_back():
    assert set(EXPECTED) == set(V.VARIANTS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_settings_equal_the_reference_config(name):
    file, seconds = EXPECTED[name]
    ref = yaml.safe_load(REFERENCE[file])
    v = V.VARIANTS[name]
    model, attn = ref["model"], ref["model"]["attention"]
    assert v.steps == model["num_steps"]
    assert v.guidance_scale == model["guidance_weight"]
    assert list(v.rope_scale) == ref["metrics"]["scale_factor"]
    if attn["type"] == "nabla":
        assert (v.attention, v.nabla_P) == ("nabla", attn["P"])
        assert v.nabla_windows == (attn["wT"], attn["wH"], attn["wW"])
        assert attn.get("method", "topcdf") == "topcdf" and attn.get("add_sta", True)
    else:
        assert attn["type"] == "flash" and v.attention == "dense" and v.nabla_windows is None
    ratios = ref.get("magcache", {}).get("mag_ratios")
    if name in NO_OWN_CONFIG:
        assert v.mag_ratios is None  # calibrated on the sft weights, not these
    else:
        assert v.mag_ratios == (tuple(float(r) for r in ratios) if ratios else None)
        if ratios:
            assert len(ratios) == 98  # 2 * 50 steps minus the reference's two leading ones
        # The nocfg 10 s YAML names the sft 10 s file (a config typo; the repo holds nocfg_10s) and the old
        # ai-forever pretrain config a pre-release file name; the others name the repo's file exactly.
        if name not in ("t2v-lite-nocfg-10s", "t2v-lite-pretrain-5s") and "checkpoint_path" in model:
            assert model["checkpoint_path"] == "./weights/" + v.weights
    if seconds:
        assert v.shift == 5.0  # test.py --scheduler_scale default, used by every README command
        assert v.num_frames == seconds * 24 // 4 * 4 + 1
        assert (v.height, v.width) == SIZE[ref["metrics"]["resolution"]]
    else:
        assert v.num_frames == 1 and ref["metrics"]["resolution"] == 1024
        assert v.shift == IMAGE_CALL_DEFAULTS["scheduler_scale"]
        assert (v.height, v.width) == (IMAGE_CALL_DEFAULTS["height"], IMAGE_CALL_DEFAULTS["width"])


@pytest.mark.parametrize("name", sorted(IMAGE_REPOS))
def test_image_rows_name_the_reference_repos_and_files(name):
    repo, weights = IMAGE_REPOS[name]
    v = V.VARIANTS[name]
    assert v.repo == repo  # its -Diffusers repo: test_image_rows_agree_with_diffusers_and_the_engine
    if weights is not None:
        assert v.weights == "model/" + weights
    assert V.recognise(repo) is v and V.recognise(v.diffusers_repo) is v


def test_image_rows_agree_with_diffusers_and_the_engine():
    """diffusers' image pipelines (installed: an oracle independent of the reference's YAML) and the defaults the
    engine runs an image request with (k5.engine.pipelines.image_request) give the same settings as the catalogue."""
    import inspect

    import diffusers.pipelines.kandinsky5.pipeline_kandinsky_i2i as d_i2i
    import diffusers.pipelines.kandinsky5.pipeline_kandinsky_t2i as d_t2i

    from k5.engine.pipelines import image_request as image

    for module, cls, task in ((d_t2i, d_t2i.Kandinsky5T2IPipeline, "t2i"), (d_i2i, d_i2i.Kandinsky5I2IPipeline, "i2i")):
        call = {k: p.default for k, p in inspect.signature(cls.__call__).parameters.items()}
        named = set(re.findall(r"kandinskylab/Kandinsky-5\.0-[\w.-]+-Diffusers", inspect.getsource(module)))
        rows = [v for v in V.VARIANTS.values() if v.task == task]
        assert {v.diffusers_repo for v in rows} == named
        for v in rows:
            assert (v.steps, v.guidance_scale) == (call["num_inference_steps"], call["guidance_scale"])
            d = v.defaults()
            # T2I: 1024x1024 as diffusers; I2I: no size (diffusers and the engine take the source image's bucket)
            assert (d["height"], d["width"]) == (call["height"], call["width"])
            image.ImageRequest("a cat", **d)  # an image request's fields (no frames)
            assert (v.steps, v.guidance_scale, v.shift) == (image.STEPS, image.GUIDANCE_SCALE, image.DEFAULT_SHIFT)
            assert (v.height, v.width) == image.DEFAULT_SIZE and v.rope_scale == image.ROPE_SCALE


def test_families_and_tasks_by_name():
    for v in V.VARIANTS.values():
        assert v.task == v.name[:3]
        assert v.family == ("pro" if "-pro-" in v.name else "image-lite" if v.task in ("t2i", "i2i") else "lite")
        assert v.repo.startswith("kandinskylab/Kandinsky-5.0-") and v.weights.startswith("model/")


def test_unknown_variant_names_the_closest():
    with pytest.raises(V.VariantError, match=r"unknown variant 't2v-lite-sft-5'; did you mean t2v-lite-sft-5s"):
        V.get("t2v-lite-sft-5")
    with pytest.raises(V.VariantError, match="see --list-variants"):
        V.get("zzzz")
    assert V.get(" T2V-Lite-SFT-10s ").name == "t2v-lite-sft-10s"


@pytest.mark.parametrize("text, name", [
    ("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers", "t2v-lite-sft-5s"),
    ("kandinskylab/Kandinsky-5.0-T2V-Lite-distilled16steps-10s", "t2v-lite-distilled16steps-10s"),
    ("ai-forever/Kandinsky-5.0-T2V-Lite-nocfg-5s-Diffusers", "t2v-lite-nocfg-5s"),
    ("/models/Kandinsky-5.0-I2V-Lite-5s/", "i2v-lite-5s"),
    ("models--kandinskylab--Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers", "t2v-pro-sft-5s-hd"),  # SD/HD repo: HD
    ("kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s", "i2v-pro-sft-5s-hd"),
    ("kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers", "t2i-lite-sft"),
])
def test_recognise(text, name):
    assert V.recognise(text).name == name


def test_recognise_nothing():
    assert V.recognise("/models/my-finetune") is None


def test_check_fits_names_both():
    V.check_fits(V.get("t2v-pro-sft-5s-hd"), PRESETS["pro-hd"])
    with pytest.raises(V.VariantError, match=r"t2v-pro-sft-5s-sd is for Kandinsky 5 pro weights \(model_dim 4096.*"
                                             r"has lite weights \(model_dim 1792.*t2v-lite-sft-5s"):
        V.check_fits(V.get("t2v-pro-sft-5s-sd"), PRESETS["lite"])


def test_magcache_refused_without_ratios():
    assert len(V.check_magcache(V.get("t2v-lite-sft-5s"))) == 98
    with pytest.raises(V.VariantError, match=r"t2v-lite-distilled16steps-5s has no MagCache ratios.*t2v-lite-sft-5s"):
        V.check_magcache(V.get("t2v-lite-distilled16steps-5s"))


def test_configure_sets_the_attention_fields():
    dense = PRESETS["lite"]
    cfg = V.get("t2v-lite-sft-10s").configure(dense)
    assert (cfg.attention_type, cfg.attention_P, cfg.attention_wT, cfg.attention_wH, cfg.attention_wW) == \
        ("nabla", 0.9, 11, 3, 3)
    assert V.get("t2v-lite-sft-5s").configure(cfg).uses_nabla is False


def test_recommended_layout_on_8_gpus():
    # Lite: 28 heads (Ulysses 1, 2, 4, 7); Pro 32 heads; CFG parallel only where the variant guides.
    assert recommended_layout(V.get("t2v-lite-sft-5s")) == dict(dp=1, cfg=2, ring=1, ulysses=4, tp=1)
    assert recommended_layout(V.get("t2v-lite-nocfg-10s")) == dict(dp=1, cfg=1, ring=2, ulysses=4, tp=1)
    assert recommended_layout(V.get("t2v-pro-sft-10s-hd")) == dict(dp=1, cfg=2, ring=1, ulysses=4, tp=1)


def test_memory_from_parameter_counts_and_activations():
    # Parameter bytes by hand from the module definitions (architecture note section 2.9): per visual block
    # 4 attention Linears x2 (D*D + D) + 4 q/k norms hd + FFN 2*D*F + modulation (9D*Tm + 9D) fp32.
    D, F, Tm, hd = 1792, 7168, 512, 64
    visual = 2 * (4 * (D * D + D)) * 2 + 4 * hd * 4 + 2 * D * F * 2 + (9 * D * Tm + 9 * D) * 4
    text = 4 * (D * D + D) * 2 + 2 * hd * 4 + 2 * D * F * 2 + (6 * D * Tm + 6 * D) * 4
    embed = ((Tm * D + Tm) + (Tm * Tm + Tm)) * 4 + (D * 3584 + D + 2 * D) * 2 + (Tm * 768 + Tm + 2 * Tm) * 2 \
        + (D * 4 * 33 + D) * 2 + (2 * D * Tm + 2 * D) * 4 + (64 * D + 64) * 2
    assert catalogue.dit_parameter_bytes(PRESETS["lite"]) == 32 * visual + 2 * text + embed
    # Qwen2.5-VL-7B's text decoder as engine/encoders/text.py loads it (config: hidden 3584, 28 layers, MLP 18944, 4 KV heads
    # of 128, vocabulary 152064; no lm_head, no vision tower): q/k/v with biases, o, gate/up/down, two norms a layer.
    H, kv = 3584, 512
    layer = (H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * 18944 + 2 * H
    assert catalogue.QWEN_TEXT_PARAMS == 28 * layer + 152064 * H + H
    # The catalogue's memory is the CLI's estimator (engine.memory) fed with parameter counts: on 8 GPUs the Lite
    # sft 5 s preset runs cfg 2 x Ulysses 4, the DiT's live activations are engine.memory's for that layout.
    m = catalogue.memory_per_gpu(V.get("t2v-lite-sft-5s"))
    act = dit_activation_bytes(PRESETS["lite"], Shape(121, 512, 768), torch.bfloat16, False, sp=4, ulysses=4, ring=1,
                               tp=1)
    dit, vae = catalogue.dit_parameter_bytes(PRESETS["lite"]), 246_000_000 * 2
    # On 8 GPUs the worst rank also holds cuBLAS's workspace and NCCL's buffers: six communicators of more than one
    # rank (world 8, item 8, text replica 4, sequence 4, cfg 2, ulysses 4) and the Ulysses all-to-all's 3 peers.
    nccl = 6 * memory.NCCL_COMMUNICATOR + 3 * memory.NCCL_PEER
    assert memory.nccl_bytes(sp=4, ulysses=4, cfg_degree=2) == nccl
    assert m["phases"]["denoise"] * catalogue.GIB == pytest.approx(dit + vae + act + memory._RUNTIME + memory.CUBLAS_WORKSPACE
                                                            + nccl)  # --offload text
    assert m["text_encoders"] * catalogue.GIB == catalogue.QWEN_TEXT_PARAMS * 2 + catalogue.CLIP_PARAMS * 4
    assert m["peak"] == max(m["phases"].values()) and m["peak_phase"] == "text"  # the encoders beside the DiT
    assert all(r["memory_gib"] < 80 for r in catalogue.table())  # every variant fits an 80 GB GPU on 8 GPUs
