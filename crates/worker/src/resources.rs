//! What a worker offers: detected from the machine (cores, memory, the disk that holds Docker's
//! data, NVIDIA GPUs), each overridable by the operator, and the usage it reports with every
//! heartbeat.

use std::path::Path;
use std::process::Command;

use crate::model::{BYTES_PER_GB, Resources, WorkerUsage};

/// One GPU `nvidia-smi` reported.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuDevice {
    pub index: u32,
    pub uuid: String,
    pub name: String,
}

/// What the machine has, as detected.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    /// Cores this process may run on (cgroup and affinity limits included).
    pub cpu: f64,
    /// Physical memory, GB.
    pub memory: f64,
    /// Free space on the filesystem of `storage_path`, GB (`None` when no disk holds it).
    pub storage: Option<f64>,
    pub gpus: Vec<GpuDevice>,
    /// Why no GPU was found, when none was (for the start-up log).
    pub gpu_note: Option<String>,
}

/// The operator's overrides; `None` keeps the detected amount.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub cpu: Option<f64>,
    pub memory: Option<f64>,
    pub storage: Option<f64>,
    pub gpu: Option<f64>,
}

impl Detected {
    /// Probes this machine. `storage_path` is the directory containers write to (Docker's data
    /// root): its filesystem's free space is what the worker offers.
    pub fn probe(storage_path: &Path) -> Detected {
        let cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let memory = match sysinfo::System::new() {
            Ok(mut system) => {
                system.refresh_memory();
                system.total_memory() as f64 / BYTES_PER_GB
            }
            Err(_) => 0.0,
        };
        let storage = free_space(storage_path).map(|bytes| bytes as f64 / BYTES_PER_GB);
        let (gpus, gpu_note) = match Command::new("nvidia-smi")
            .args([
                "--query-gpu=index,uuid,name",
                "--format=csv,noheader,nounits",
            ])
            .output()
        {
            Ok(out) if out.status.success() => {
                let gpus = parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout));
                let note = gpus
                    .is_empty()
                    .then(|| "nvidia-smi listed no GPU".to_string());
                (gpus, note)
            }
            Ok(out) => (
                Vec::new(),
                Some(format!(
                    "nvidia-smi failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            ),
            Err(e) => (Vec::new(), Some(format!("no nvidia-smi ({e})"))),
        };
        Detected {
            cpu,
            memory,
            storage,
            gpus,
            gpu_note,
        }
    }

    /// What the worker registers with: the detected amounts, rounded down to what the API
    /// takes, with the operator's overrides applied.
    pub fn offer(&self, overrides: &Overrides) -> Resources {
        Resources::new(
            overrides.cpu.unwrap_or(self.cpu),
            overrides
                .memory
                .unwrap_or((self.memory * 100.0).floor() / 100.0),
            overrides
                .storage
                .unwrap_or_else(|| self.storage.map_or(0.0, |gb| gb.floor())),
            overrides.gpu.unwrap_or(self.gpus.len() as f64),
        )
        .quantized()
    }
}

/// Free bytes on the filesystem that holds `path`: the disk with the longest mount point that
/// is a prefix of the path.
fn free_space(path: &Path) -> Option<u64> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let disks = sysinfo::Disks::new_with_refreshed_list().ok()?;
    disks
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(sysinfo::Disk::available_space)
}

/// Parses `nvidia-smi --query-gpu=index,uuid,name --format=csv,noheader,nounits`.
pub fn parse_nvidia_smi(out: &str) -> Vec<GpuDevice> {
    out.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ',').map(str::trim);
            let index = fields.next()?.parse().ok()?;
            let uuid = fields.next()?.to_string();
            let name = fields.next().unwrap_or_default().to_string();
            (!uuid.is_empty()).then_some(GpuDevice { index, uuid, name })
        })
        .collect()
}

/// Samples the machine's CPU and memory utilisation between heartbeats.
pub struct UsageSampler {
    system: Option<sysinfo::System>,
}

impl UsageSampler {
    pub fn new() -> Self {
        let system = sysinfo::System::new().ok().map(|mut s| {
            // The first CPU reading is a baseline: usage is measured between two refreshes.
            s.refresh_cpu_usage();
            s
        });
        UsageSampler { system }
    }

    /// Utilisation since the last sample, and the tasks running now.
    pub fn sample(&mut self, running_tasks: u32) -> WorkerUsage {
        let (cpu_percent, memory_percent) = match &mut self.system {
            Some(system) => {
                system.refresh_cpu_usage();
                system.refresh_memory();
                let total = system.total_memory().max(1) as f64;
                (
                    f64::from(system.global_cpu_usage()).clamp(0.0, 100.0),
                    (system.used_memory() as f64 / total * 100.0).clamp(0.0, 100.0),
                )
            }
            None => (0.0, 0.0),
        };
        WorkerUsage {
            cpu_percent,
            memory_percent,
            running_tasks,
        }
    }
}

impl Default for UsageSampler {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn nvidia_smi_lines_become_devices_and_junk_is_skipped() {
        let out = "0, GPU-1b2c3d4e-aaaa-bbbb-cccc-000000000001, NVIDIA H100 80GB HBM3\n\
                   1, GPU-1b2c3d4e-aaaa-bbbb-cccc-000000000002, NVIDIA H100 80GB HBM3\n\
                   No devices were found\n";
        let gpus = parse_nvidia_smi(out);
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].index, 1);
        assert_eq!(gpus[1].uuid, "GPU-1b2c3d4e-aaaa-bbbb-cccc-000000000002");
        assert_eq!(gpus[0].name, "NVIDIA H100 80GB HBM3");
        assert!(parse_nvidia_smi("").is_empty());
    }

    #[test]
    fn this_machine_is_detected_and_overrides_win() {
        let detected = Detected::probe(Path::new("/"));
        assert!(detected.cpu >= 1.0, "{detected:?}");
        assert!(detected.memory > 0.1, "{detected:?}");
        assert!(detected.storage.is_some_and(|gb| gb > 0.0), "{detected:?}");
        let offer = detected.offer(&Overrides::default());
        assert_eq!(offer.cpu, detected.cpu);
        assert!(offer.memory <= detected.memory && offer.memory > detected.memory - 0.02);
        assert_eq!(offer.gpu, detected.gpus.len() as f64);
        let offer = detected.offer(&Overrides {
            cpu: Some(2.5),
            memory: Some(4.0),
            storage: Some(10.0),
            gpu: Some(1.0),
        });
        assert_eq!(offer, Resources::new(2.5, 4.0, 10.0, 1.0));
    }

    #[test]
    fn usage_is_a_percentage() {
        let mut sampler = UsageSampler::new();
        std::thread::sleep(std::time::Duration::from_millis(250));
        let usage = sampler.sample(3);
        assert!((0.0..=100.0).contains(&usage.cpu_percent), "{usage:?}");
        assert!(
            usage.memory_percent > 0.0 && usage.memory_percent <= 100.0,
            "{usage:?}"
        );
        assert_eq!(usage.running_tasks, 3);
    }
}
