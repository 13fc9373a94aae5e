"""Share models on the Hugging Face Hub: model cards rendered from `hub_cards/`, pushes that never delete or
overwrite what hf-vitseg did not write, and loading with errors that name the broken file."""

from .cards import backbone_weights, read_eval_results, read_training_recipe, render_model_card
from .loading import check_model_folder, check_safetensors_file, load_config, load_image_processor, load_model
from .push import HubUnreachableError, PushResult, check_repo_id, push_to_hub, upload_plan

__all__ = [
    "HubUnreachableError",
    "PushResult",
    "backbone_weights",
    "check_model_folder",
    "check_repo_id",
    "check_safetensors_file",
    "load_config",
    "load_image_processor",
    "load_model",
    "push_to_hub",
    "read_eval_results",
    "read_training_recipe",
    "render_model_card",
    "upload_plan",
]
