//! What the daemon speaks: the control protocol of its Unix socket (`control`), Prometheus
//! metrics (`metrics`) and systemd notifications (`notify`).

pub mod control;
pub mod metrics;
pub mod notify;
