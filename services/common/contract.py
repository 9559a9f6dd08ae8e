"""Values the contracts in protos/ define but protobuf cannot express: the scheduler names, the
cache modes and diffusers' defaults. Both the gateway (which validates) and the denoiser (which runs) read them here,
so stages never import each other."""

SCHEDULERS = ("ddim", "dpmsolver++")
DEFAULT_SCHEDULER = "ddim"
CACHE_MODES = ("none", "deep")   # GenerationParams.cache: exact, or DeepCache step caching (approximate)
DEFAULT_CACHE = "none"
DEFAULT_FRAMES = 16
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 9.0
DEFAULT_FPS = 8
DEFAULT_VAE_SCALE_FACTOR = 8   # diffusers' when no VAE is at hand; a model's own is model_folder.vae_scale_factor
TEXT_TOKENS = 77         # CLIP's context: an embedding has 77 rows per prompt ([2, 77, D] in denoiser.proto)
