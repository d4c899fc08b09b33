"""fedmnist: federated learning on MNIST with a shared Keras CNN (FedAvg, FedProx, FedMed and more)."""

__version__ = "0.1.0"
