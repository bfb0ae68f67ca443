//! What the daemon speaks: the control protocol of its Unix socket (`control`), Prometheus
//! metrics (`metrics`), systemd notifications (`notify`), and the removals the CNI plugin
//! leaves for a daemon that was not running (`pending`).

pub mod control;
pub mod metrics;
pub mod notify;
pub mod pending;
