//! Kubernetes resolution: IP/port → pod, Service, backend, node (being written).
