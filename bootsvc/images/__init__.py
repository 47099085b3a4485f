"""Managed images on the regional node (issue #25): the sync service that
fetches, verifies, caches and evicts the images its IDC should hold
(:mod:`bootsvc.images.sync`), the HTTP fetch with Range resume
(:mod:`bootsvc.images.fetch`) and the cache directory
(:mod:`bootsvc.images.cache`).  The decisions are pure, in
:mod:`bootsvc.policy.images`."""
