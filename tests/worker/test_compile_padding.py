"""Batch padding and routing of the compiled UNet (services/worker/pipelines/padding.py, served_unet.py): padded
calls give the unpadded rows, and only warmed-up grid shapes reach the compiled module."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from services.worker.pipelines.compile_grid import default_sizes, latent_size, parse_sizes
from services.worker.pipelines.padding import batch_bucket, batch_buckets, padded_call
from services.worker.pipelines.recompiles import RecompileWatch
from services.worker.pipelines.served_unet import CompiledRouter


def test_batches_pad_to_powers_of_two() -> None:
    assert [batch_bucket(n) for n in range(1, 18)] == [1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 32]
    assert batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(5) == [1, 2, 4, 8] and batch_buckets(1) == [1]
    with pytest.raises(ValueError, match="at least one row"):
        batch_bucket(0)


def _tiny_unet() -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32).eval()


def _inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 9, 16, 16, generator=gen)
    kwargs = {"encoder_hidden_states": torch.randn(batch, 77, 64, generator=gen),
              "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=gen),
                                    "time_ids": torch.randn(batch, 6, generator=gen)},
              "return_dict": False}
    return sample, torch.tensor(500.0), kwargs


def test_padded_rows_equal_the_unpadded_call() -> None:
    unet = _tiny_unet()
    seen: list[int] = []

    def recording(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(sample.shape[0])
        assert kwargs["encoder_hidden_states"].shape[0] == sample.shape[0]
        assert all(t.shape[0] == sample.shape[0] for t in kwargs["added_cond_kwargs"].values())
        return unet(sample, *args, **kwargs)

    with torch.no_grad():
        for batch in (3, 5, 6):
            sample, timestep, kwargs = _inputs(batch)
            plain = unet(sample, timestep, **kwargs)[0]
            padded = padded_call(recording, sample, timestep, **kwargs)[0]
            assert padded.shape == plain.shape
            torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-5)
        # a batched timestep is padded too
        sample, _, kwargs = _inputs(3)
        steps = torch.tensor([500.0, 400.0, 300.0])
        torch.testing.assert_close(padded_call(recording, sample, steps, **kwargs)[0], unet(sample, steps, **kwargs)[0],
                                   rtol=1e-4, atol=1e-5)
    assert seen == [4, 8, 8, 4]


def test_the_router_serves_only_warmed_grid_shapes(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[str, int]] = []

    def compiled(sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(("compiled", sample.shape[0]))
        return sample * 2

    def eager(sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(("eager", sample.shape[0]))
        return sample * 2

    router = CompiledRouter(eager, compiled, [(8, 8)], RecompileWatch())  # type: ignore[arg-type]
    router.warming = True
    router(torch.ones(2, 4, 8, 8))  # warms (8x8, 2)
    router.warming = False
    with caplog.at_level(logging.INFO, logger="services.worker.pipelines.served_unet"):
        out = router(torch.ones(2, 4, 8, 8))
        router(torch.ones(3, 4, 8, 8))  # bucket 4 was not warmed
        router(torch.ones(1, 4, 6, 8))  # off the grid
        router(torch.ones(1, 4, 6, 8))
    assert out.shape == (2, 4, 8, 8)
    assert calls == [("compiled", 2), ("compiled", 2), ("eager", 3), ("eager", 1), ("eager", 1)]
    assert sum("latent 6x8 is not in COMPILE_SIZES" in r.message for r in caplog.records) == 1  # once per size
    assert sum("was not warmed up" in r.message for r in caplog.records) == 1


def test_the_size_grid() -> None:
    assert parse_sizes("1024x1024, 768X1024;1024x1024") == [(1024, 1024), (768, 1024)]
    assert default_sizes(1024, 8) == [(1024, 1024), (512, 512), (768, 1024), (576, 1024), (1024, 768), (1024, 576)]
    assert default_sizes(64, 8) == [(64, 64), (32, 32), (48, 64), (32, 64), (64, 48), (64, 32)]
    assert latent_size((768, 1024), 8) == (128, 96)  # (height, width) of the latent


def test_compiles_after_warm_up_are_counted_as_recompiles() -> None:
    torch._dynamo.reset()  # (this also clears dynamo's callbacks: install after it)
    watch = RecompileWatch()
    if not watch.install():
        pytest.skip("this torch has no dynamo compile callbacks")
    try:
        fn = torch.compile(lambda x: x + 1, backend="eager", dynamic=False)
        watch.calling("warm")
        fn(torch.ones(2))
        watch.warming = False
        fn(torch.ones(2))  # cached: no compile
        watch.calling("a new shape")
        fn(torch.ones(3))
        watch.calling(None)
        fn(torch.ones(5))  # not the UNet's call: not counted
    finally:
        watch.close()
    assert (watch.compiles, watch.recompiles) == (2, 1)
