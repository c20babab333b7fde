"""The model families stepdistill knows: the one place they are named (a leaf module, no imports).

A family fixes the denoiser's conventions (UNet or transformer call, prediction type, conditioning
tensors) and the diffusers pipeline class it is loaded and exported with.
"""

FAMILIES = ("sd15", "sd2", "sdxl", "sd3", "flux")
FAMILY_CHOICES = ("auto", *FAMILIES)  # model.family in a config: "auto" reads model_index.json

UNET_FAMILIES = ("sd15", "sd2", "sdxl")

# Pipeline class -> family. StableDiffusionPipeline is SD 1.x or 2.x; models.loading.detect_family tells them apart.
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": ("sd15", "sd2"),
    "StableDiffusionXLPipeline": ("sdxl",),
    "StableDiffusion3Pipeline": ("sd3",),
    "FluxPipeline": ("flux",),
}

__all__ = ["FAMILIES", "FAMILY_CHOICES", "PIPELINE_FAMILIES", "UNET_FAMILIES"]
