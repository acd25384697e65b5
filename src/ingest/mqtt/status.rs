//! The MQTT sources' health, as `/health` reports it. It lives with the sources
//! that set it; the HTTP layer only reads it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether an MQTT source is running, for `/health`.
#[derive(Clone)]
pub struct MqttStatus {
    pub backend: &'static str,
    ok: Arc<AtomicBool>,
}

impl MqttStatus {
    pub fn new(backend: &'static str, ok: bool) -> Self {
        Self {
            backend,
            ok: Arc::new(AtomicBool::new(ok)),
        }
    }

    pub fn set_ok(&self, ok: bool) {
        self.ok.store(ok, Ordering::Relaxed);
    }

    pub fn is_ok(&self) -> bool {
        self.ok.load(Ordering::Relaxed)
    }
}
