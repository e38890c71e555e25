"""Using a trained medfed model outside training: export, preprocessing, prediction, Grad-CAM.

* :mod:`federation.inference.export` - ``export/`` of a run (state_dict, torch.export
  program with softmax output, ``model.json``) and loading it back.
* :mod:`federation.inference.preprocess` - DICOM/PNG/.npz inputs read exactly as training read them.
* :mod:`federation.inference.attribution` - explanation methods by name
  (``integrated_gradients`` by default, ``occlusion``, ``gradcam``; one module each).
* :mod:`federation.inference.overlays` - PNGs: each image beside its overlay, with a colour bar.
* :mod:`federation.inference.pointing` - pointing game / mass inside known lesions.
* :mod:`federation.inference.predict` - probabilities for a file or folder.
"""

from federation.inference.export import (
    EXPORT_DIR,
    ExportedModel,
    export_dir_of,
    export_model,
    load_exported,
    load_run_model,
    read_export_meta,
)
from federation.inference.attribution import DEFAULT_ATTRIBUTION, available_attributions, make_attributor
from federation.inference.gradcam import GradCamExplainer, default_target_layer, grad_cam
from federation.inference.overlays import Overlay, save_overlays
from federation.inference.predict import Prediction, predict_inputs, write_predictions_csv
from federation.inference.preprocess import InputImage, Preprocessing, iter_inputs, list_inputs, load_inputs

__all__ = [
    "DEFAULT_ATTRIBUTION",
    "EXPORT_DIR",
    "ExportedModel",
    "GradCamExplainer",
    "InputImage",
    "Overlay",
    "Prediction",
    "Preprocessing",
    "available_attributions",
    "default_target_layer",
    "export_dir_of",
    "export_model",
    "grad_cam",
    "iter_inputs",
    "list_inputs",
    "load_exported",
    "load_inputs",
    "load_run_model",
    "make_attributor",
    "predict_inputs",
    "read_export_meta",
    "save_overlays",
    "write_predictions_csv",
]
