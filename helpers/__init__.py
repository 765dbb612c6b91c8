"""Shared code of the Qwen2.5-VL course.

Each module names the notebook that teaches it:

- ``helpers.qwen``          00: the offline processor, the course model, the 3B config.
- ``helpers.chat``          01: conversations, token chips, the loss mask.
- ``helpers.vision``        02: smart_resize, the double resize, the box widget.
- ``helpers.boxes``         01–02, 10–11: box mapping (sizes (height, width)), IoU, the grounding
  answers (the released fenced layout, the course task's compact one) and their one parser.
- ``helpers.constants``     02–07: patch 14, merge 2, factor 28, the pixel limits, defined once.
- ``helpers.video``         03: smart_nframes, the synthetic video.
- ``helpers.patches``       04: patchify / unpatchify.
- ``helpers.vision_tower``  05–07: patch embed, window attention, vision RoPE, merger, the tower;
  ``helpers.vision_tower_plots`` its figures and widgets; ``helpers.layers`` RMSNorm and the rotary
  embedding the tower and the decoder (09) share.
- ``helpers.rope``          08: M-RoPE position ids (rope_index); ``helpers.rope_inputs`` the example
  inputs and random batches it is checked on.
- ``helpers.forward``       09: the forward pass step by step, greedy decoding, the 3B budget.
- ``helpers.data``, ``helpers.sft``        10: the shapes task and supervised fine-tuning; beside them
  ``helpers.recipes`` (the settings in force: course model or checkpoint), ``helpers.optim``,
  ``helpers.lora``, ``helpers.sft_plots``.
- ``helpers.evaluation``, ``helpers.checkpoints``  10–11: the one evaluator (with image-blind
  baselines and significance); atomic checkpoints, resume, the cached SFT starts.
- ``helpers.rewards``, ``helpers.rollouts``, ``helpers.grpo``   11: verifiable rewards, rollouts and
  their log-probabilities, GRPO (typed settings, loss, loop, SFT control); ``helpers.grpo_trl`` the
  TRL route, ``helpers.grpo_plots`` its pictures and the rollout browser.
- ``helpers.packing``       12: packed rows (4-row position ids, labels unchanged), what padding costs;
  ``helpers.segment_attention`` one attention call over many segments (windows, conversations).
- ``helpers.own_data``      13: your own dataset (layouts, reading with datasets, validation, the
  token/memory estimate, the demo dataset); ``helpers.own_data_run`` the run behind
  ``python -m helpers.sft --data``, its report and the row browser.
- ``helpers.plots``, ``helpers.widgets``   figure style; widget plumbing and registry.
- ``helpers.profiles``      the cpu / gpu profiles (``QWENVL_PROFILE``) as frozen typed settings.
- ``helpers.netguard``      the offline guard the tests switch on.
- ``helpers.cache``         00: the cache folder, hashed manifests, atomic locked writes; the scratch
  folders removed when the kernel exits.
- ``helpers.known_warnings``  10–13: the libraries' own deprecation warnings, silenced by message.
"""

import os as _os

# Nothing in this course may reach a model hub: set before transformers is imported.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if _os.environ.get("QWENVL_BLOCK_NETWORK") == "1":
    from helpers.netguard import block_network as _block_network

    _block_network()
