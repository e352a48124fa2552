"""siglip-dense: SigLIP 2 vision encoders as dense predictors (segmentation, depth, detection)."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """Config arithmetic the recipes need (sliding-window stride = 2/3 of the crop, as mmseg's 512/341)."""
    if not OmegaConf.has_resolver("two_thirds"):
        OmegaConf.register_new_resolver("two_thirds", lambda x: int(x) * 2 // 3)


_register_resolvers()


def load_model(path: str, device: str = "cpu"):  # noqa: ANN201 - a DenseTask, imported lazily
    """A ready model, in eval mode: ``model.predict(images[, classes=...])``.

    A trained checkpoint or an export directory -> its task (``siglip_dense.checkpoints.load_model``);
    a SigLIP (2) image-text checkpoint -> the training-free open-vocabulary segmenter
    (``siglip_dense.openvocab.load_model``). Dispatched here so that neither module imports the other.
    """
    from siglip_dense.openvocab.zeroshot import is_image_text_checkpoint

    if is_image_text_checkpoint(path):
        from siglip_dense.openvocab import load_model as load_open_vocab

        return load_open_vocab(path, device=device)
    from siglip_dense.checkpoints import load_model as load_task_model

    return load_task_model(path, device=device)
