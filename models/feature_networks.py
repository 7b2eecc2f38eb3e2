"""The feature networks phi of DFI (models/dfi.py): VGG19's conv3_1, conv4_1 and conv5_1 on ImageNet weights from a
local file, or the same scales of a store-trained train_oracle.py network; each returns its three post-ReLU maps."""
import os
import re

IMAGENET_LAYERS = ("block3_conv1", "block4_conv1", "block5_conv1")
VGG19_NOTOP = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def imagenet_weights(path=""):
    """The local VGG19 no-top weights file: `path`, else the Keras cache; never downloaded."""
    path = path or os.path.join(os.path.expanduser("~"), ".keras", "models", VGG19_NOTOP)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet VGG19 weights not found at {path}. Nothing is downloaded at run time: on a machine with "
            f"network, `python -c \"import keras; keras.applications.VGG19(include_top=False)\"` saves {VGG19_NOTOP} "
            "to ~/.keras/models/; copy it here and pass --vgg-weights PATH (or use --features RUN, a train_oracle.py run)")
    return path


def imagenet_features(size, weights, channels=1):
    """VGG19 to conv5_1 on [-1, 1] images with caffe preprocessing (255 scale, BGR mean removed): grey slices
    tiled to 3 channels, RGB images reordered to BGR. `weights`: the no-top .h5 file, or None for random
    weights (tests and benchmarks only)."""
    import keras
    from keras import layers
    if channels not in (1, 3):
        raise ValueError(f"ImageNet VGG19 reads grey or RGB images, not {channels} channels")
    vgg = keras.applications.VGG19(include_top=False, weights=weights, input_shape=(size, size, 3))
    x = keras.Input((size, size, channels), name="image")
    three = layers.Concatenate()([x, x, x]) if channels == 1 else layers.Lambda(lambda v: v[..., ::-1])(x)
    bgr = layers.Rescaling(127.5, offset=[127.5 - m for m in CAFFE_MEAN_BGR])(three)
    trunk = keras.Model(vgg.inputs, [vgg.get_layer(n).output for n in IMAGENET_LAYERS])
    return keras.Model(x, trunk(bgr), name="vgg19_features")


def store_features(run_dir):
    """The post-ReLU first conv of the last three pooling levels of a train_oracle.py run's network."""
    import keras
    from models.oracle import load_oracle
    model = load_oracle(run_dir).model
    names = sorted((l.name for l in model.layers if re.fullmatch(r"block\d+_relu1", l.name)),
                   key=lambda n: int(n[5:].split("_")[0]))
    if len(names) < 3:
        raise ValueError(f"{run_dir}: its network has {len(names)} pooling levels, DFI needs 3 "
                         "(train it without --tiny)")
    return keras.Model(model.input, [model.get_layer(n).output for n in names[-3:]], name="store_features")


def features_from_args(args, size):
    if args["features"] == "imagenet":
        return imagenet_features(size, imagenet_weights(args.get("vgg_weights", "")), args.get("channels", 1))
    return store_features(args["features"])
