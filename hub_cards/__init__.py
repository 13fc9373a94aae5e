"""Model-card templates (YAML metadata + prose), shipped in the wheel as the data package `hf_vitseg.hub_cards`."""
