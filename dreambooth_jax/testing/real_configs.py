"""The UNet configs of published checkpoints that cannot be downloaded here (written from the
published config.json files; no weights): for abstract builds in tests and for scripts/scale_report.py.

The IF dicts are from memory of the hub files: diffusers builds 2.45 B parameters from IF-I-XL's
(published: 4.3 B) and 1.33 B from IF-II-L's (1.2 B), so a key may be off; check against the real
files when at hand (tests/test_unet_if.py pins the counts these dicts give).
"""

IF_UNETS = {
    "IF-I-XL-v1.0": {
        "act_fn": "gelu", "addition_embed_type": "text", "addition_embed_type_num_heads": 64, "attention_head_dim": 64,
        "block_out_channels": [512, 1024, 1536, 2048], "class_embed_type": None, "class_embeddings_concat": False,
        "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 4096, "cross_attention_norm": "group_norm",
        "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                             "SimpleCrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": 4096,
        "encoder_hid_dim_type": "text_proj", "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 3,
        "layers_per_block": 3, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_class_embeds": None, "only_cross_attention": False, "out_channels": 6,
        "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": True,
        "resnet_time_scale_shift": "scale_shift", "sample_size": 64, "time_cond_proj_dim": None,
        "time_embedding_act_fn": "gelu", "time_embedding_dim": None, "time_embedding_type": "positional",
        "timestep_post_act": None,
        "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                           "ResnetUpsampleBlock2D"],
        "upcast_attention": False, "use_linear_projection": False},
    "IF-II-L-v1.0": {
        "act_fn": "gelu", "addition_embed_type": "text", "addition_embed_type_num_heads": 64, "attention_head_dim": 64,
        "block_out_channels": [128, 256, 512, 1024, 1280, 1280], "class_embed_type": "timestep",
        "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 1280,
        "cross_attention_norm": "group_norm",
        "down_block_types": ["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D",
                             "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": 4096,
        "encoder_hid_dim_type": "text_proj", "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 6,
        "layers_per_block": [2, 2, 2, 3, 3, 3], "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_class_embeds": None, "only_cross_attention": False, "out_channels": 6,
        "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": True,
        "resnet_time_scale_shift": "scale_shift", "sample_size": 256, "time_cond_proj_dim": None,
        "time_embedding_act_fn": "gelu", "time_embedding_dim": 1280, "time_embedding_type": "positional",
        "timestep_post_act": None,
        "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                           "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
        "upcast_attention": False, "use_linear_projection": False},
}
