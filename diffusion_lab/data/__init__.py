"""Data: LightningDataModules (digits, mnist, cifar, celeba, image folders), transforms and captions."""
