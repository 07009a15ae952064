//! Which of this machine's GPUs each running task holds. Docker's `--gpus N` picks devices by
//! itself, so two tasks asking for one GPU each would both get the first: the agent hands out
//! exact device ids instead, and takes them back when the task ends.

use std::sync::{Arc, Mutex};

use crate::executor::GpuRequest;

/// The free devices of this machine; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct GpuPool {
    free: Arc<Mutex<Vec<String>>>,
}

/// Devices held by one task, given back when dropped.
pub struct GpuLease {
    pool: GpuPool,
    devices: Vec<String>,
}

impl GpuPool {
    /// A pool of these device ids (UUIDs from `nvidia-smi`), in order.
    pub fn new(devices: Vec<String>) -> Self {
        GpuPool {
            free: Arc::new(Mutex::new(devices)),
        }
    }

    /// The request for `req_gpu` devices (a fraction counts as a whole device): exact free
    /// devices when the pool has enough, else a plain count (when the machine's GPUs were not
    /// detected, e.g. given by `--gpus`, Docker picks).
    pub fn take(&self, req_gpu: f64) -> (GpuRequest, Option<GpuLease>) {
        if req_gpu <= 0.0 {
            return (GpuRequest::None, None);
        }
        let wanted = req_gpu.ceil().min(f64::from(u32::MAX)) as u32;
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < wanted as usize {
            if !free.is_empty() {
                tracing::warn!(
                    wanted,
                    free = free.len(),
                    "fewer free GPUs than the host reserved: Docker picks the devices"
                );
            }
            return (GpuRequest::Count(wanted), None);
        }
        let devices: Vec<String> = free.drain(..wanted as usize).collect();
        (
            GpuRequest::DeviceIds(devices.clone()),
            Some(GpuLease {
                pool: self.clone(),
                devices,
            }),
        )
    }
}

impl Drop for GpuLease {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        free.append(&mut self.devices);
        free.sort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_get_distinct_devices_and_give_them_back() {
        let pool = GpuPool::new(vec!["GPU-a".into(), "GPU-b".into(), "GPU-c".into()]);
        let (first, lease1) = pool.take(1.0);
        let (second, lease2) = pool.take(0.5);
        assert_eq!(first, GpuRequest::DeviceIds(vec!["GPU-a".into()]));
        assert_eq!(second, GpuRequest::DeviceIds(vec!["GPU-b".into()]));
        // Two more than are free: Docker decides (the host should never ask this).
        assert_eq!(pool.take(2.0).0, GpuRequest::Count(2));
        drop(lease1);
        let (third, _lease3) = pool.take(2.0);
        assert_eq!(
            third,
            GpuRequest::DeviceIds(vec!["GPU-a".into(), "GPU-c".into()])
        );
        drop(lease2);
        assert_eq!(pool.take(0.0).0, GpuRequest::None);
        // No detected devices: a count.
        assert_eq!(GpuPool::default().take(1.0).0, GpuRequest::Count(1));
    }
}
