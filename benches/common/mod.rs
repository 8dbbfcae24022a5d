//! Helpers shared by the benchmarks (a module, not a bench target: no main.rs).
//! Each bench target compiles this module and uses a part of it.
#![allow(dead_code)]

/// An environment variable as a number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// This process's resident set, in bytes.
pub fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

/// Bytes this process has caused to be written to the storage device
/// (`/proc/self/io` `write_bytes`).
pub fn disk_write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Bytes written to the block device that holds `path`, by every process (its
/// `/sys/dev/block/MAJ:MIN/stat` sectors written × 512), or `None` when `path` is not on
/// a block device (tmpfs, overlay). What `write_bytes` misses: that counts a page each
/// time a write dirties it again, so many small flushes to the same log pages count
/// many times what reaches the device.
pub fn device_write_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff));
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    stat.split_whitespace().nth(6)?.parse::<u64>().ok().map(|sectors| sectors * 512)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `q` quantile of sorted samples.
pub fn pct<T: Copy + Into<f64>>(sorted: &[T], q: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * q) as usize).map(|v| (*v).into()).unwrap_or(0.0)
}

/// Device type `meter` and one twin per id, each with a device token (in the same order).
pub async fn meter_fleet(p: &twinfleet::Platform, ids: &[String]) -> Vec<String> {
    use twinfleet::models::{DeviceTypeId, TwinId};
    let spec = twinfleet::DeviceTypeSpec {
        id: DeviceTypeId::new("meter").unwrap(),
        model: "m".into(),
        defaults: Default::default(),
        domain: None,
        journal: Default::default(),
        history: Default::default(),
        provisioning: None,
        metrics: None,
    };
    let ty = p.create_device_type(spec).await.unwrap();
    ty.spawn_fleet(ids.iter().map(|id| twinfleet::TwinSpec::new(TwinId::new(id).unwrap())).collect()).await.unwrap();
    let mut tokens = Vec::with_capacity(ids.len());
    for id in ids {
        tokens.push(p.issue_device_token(id).await.unwrap());
    }
    tokens
}

/// Sensor-like values: an ARMA(4,3) process around `mean` with Gaussian innovations of
/// `sigma`, rounded to 2 decimals as a sensor reports them (the humidity model of
/// Bigler 2025, section 9, has orders p = 4, q = 3). Deterministic from `seed`.
pub struct Arma {
    rng: u64,
    mean: f64,
    sigma: f64,
    x: [f64; 4],
    e: [f64; 3],
}

impl Arma {
    const PHI: [f64; 4] = [0.55, 0.2, 0.1, 0.05];
    const THETA: [f64; 3] = [0.4, 0.2, 0.1];

    pub fn new(seed: u64, mean: f64, sigma: f64) -> Arma {
        Arma { rng: seed | 1, mean, sigma, x: [0.0; 4], e: [0.0; 3] }
    }

    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        ((self.rng >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn gauss(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// The next reading, rounded to 2 decimals.
    pub fn next_value(&mut self) -> f64 {
        let eps = self.gauss() * self.sigma;
        let ar: f64 = Self::PHI.iter().zip(&self.x).map(|(p, x)| p * x).sum();
        let ma: f64 = Self::THETA.iter().zip(&self.e).map(|(t, e)| t * e).sum();
        let x = ar + ma + eps;
        self.x.rotate_right(1);
        self.x[0] = x;
        self.e.rotate_right(1);
        self.e[0] = eps;
        ((self.mean + x) * 100.0).round() / 100.0
    }
}

/// The CPU time (user + system) a process has used so far, in ms (`/proc/<pid>/stat`;
/// `"self"` for this one).
pub fn cpu_ms(pid: &str) -> f64 {
    let (user, system) = cpu_user_system_ms(pid);
    user + system
}

/// The CPU time process `pid` (or `"self"`) has used so far, user and system apart, in
/// milliseconds.
pub fn cpu_user_system_ms(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields 14 and 15 (utime, stime), in clock ticks of 10 ms, after the command name.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let mut ticks = after.split_whitespace().skip(11).map(|t| t.parse::<f64>().unwrap_or(0.0) * 10.0);
    (ticks.next().unwrap_or(0.0), ticks.next().unwrap_or(0.0))
}

/// A Mosquitto broker on a free loopback port, configured with `conf` (lines after the
/// listener's), for a baseline row; `None` (and a loud line) where it is not installed.
/// Killed when dropped.
pub struct Mosquitto {
    child: std::process::Child,
    pub port: u16,
}

impl Mosquitto {
    /// Its process id, for [`cpu_ms`].
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn start(dir: &std::path::Path, conf: &str) -> Option<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, format!("listener {port} 127.0.0.1\n{conf}")).unwrap();
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Until it accepts.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(Mosquitto { child, port })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
