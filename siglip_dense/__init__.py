"""siglip-dense: SigLIP 2 vision encoders as dense predictors (segmentation, depth, detection)."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """Config arithmetic the recipes need (sliding-window stride = 2/3 of the crop, as mmseg's 512/341)."""
    if not OmegaConf.has_resolver("two_thirds"):
        OmegaConf.register_new_resolver("two_thirds", lambda x: int(x) * 2 // 3)


_register_resolvers()


def load_model(path: str, device: str = "cpu"):  # noqa: ANN201 - a DenseTask, imported lazily
    """A trained model from a checkpoint or an export directory, ready for ``model.predict(images)``."""
    from siglip_dense.checkpoints import load_model as _load

    return _load(path, device=device)
