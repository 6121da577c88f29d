"""What tests and the bench share: paths, servers, certificates, policy modules and real components.

- `paths`: the repository, the conformance data and test policies, JSON fixtures;
- `server`: a real kwserver on free loopback ports, waiting for it, stopping processes, the CLI;
- `certs`: throwaway certificate authorities and certificates (the openssl CLI);
- `modules`: small hand-written policy modules (WAT) and the in-process evaluator;
- `kube_api`, `registries`, `otlp_receiver`, `pod`: a Kubernetes API server, OCI registries and web
  servers, an OTLP collector, and the pod the Kubewarden controller lays out.

Plain modules, no pytest fixtures: tests/conftest.py holds those.
"""
