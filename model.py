"""The shared CNN of the federation; `python model.py` prints its summary and fingerprint."""

from fedmnist.model import DEFAULT_SEED, build_model, count_params, model_fingerprint

__all__ = ["DEFAULT_SEED", "build_model"]

if __name__ == "__main__":
    model = build_model(DEFAULT_SEED)
    model.summary()
    print(f"trainable parameters: {count_params(model):,}")
    print(f"model fingerprint: {model_fingerprint()}")
