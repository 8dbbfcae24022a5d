//! The `twinfleet` binary: `twinfleet run` starts the platform on its embedded defaults
//! (sled in `./twinfleet-data`, HTTP on 127.0.0.1:8080, gRPC on 127.0.0.1:50051) and stops cleanly on Ctrl-C or
//! SIGTERM.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use twinfleet::Platform;
use twinfleet::config::{PartialConfig, RunConfig, resolve};
use twinfleet_protocols::{GrpcGateway, HttpApi, MqttConfig, MqttGateway};

mod cli;

// mimalloc instead of glibc malloc: a fleet is millions of small, long-lived allocations
// made and freed from several arbiter threads, where glibc's arenas spend their time
// consolidating. Measured with `cargo bench --bench fleet` on 2 cores (BENCHMARKS.md):
// spawning 1M twins 3.8 s -> 2.3 s, restoring them 5.5 s -> 2.4 s, durable writes from
// 10k callers 28k/s -> 46k/s, for about 11% more resident memory per twin.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "twinfleet", version, about = "A live digital twin, an actor, for every device of an IoT fleet")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the platform (embedded storage, HTTP API) until Ctrl-C or SIGTERM.
    Run(RunArgs),
    /// Twins of a running instance (over its HTTP API).
    Twins {
        #[command(flatten)]
        client: cli::ClientArgs,
        #[command(subcommand)]
        command: cli::TwinsCommand,
    },
    /// One twin of a running instance.
    Twin {
        #[command(flatten)]
        client: cli::ClientArgs,
        #[command(subcommand)]
        command: cli::TwinCommand,
    },
    /// The actor tree of a running instance.
    Actors {
        #[command(flatten)]
        client: cli::ClientArgs,
        #[command(flatten)]
        query: cli::ActorsArgs,
    },
    /// Long-running jobs of a running instance.
    Jobs {
        #[command(flatten)]
        client: cli::ClientArgs,
        #[command(subcommand)]
        command: cli::JobsCommand,
    },
    /// The monitoring alerts of a running instance (filters; `--ack ID`).
    Alerts {
        #[command(flatten)]
        client: cli::ClientArgs,
        #[command(flatten)]
        query: cli::AlertsArgs,
    },
    /// Fleet rollouts of a running instance: list, show, start, pause, resume, cancel.
    Rollouts {
        #[command(flatten)]
        client: cli::ClientArgs,
        #[command(subcommand)]
        command: cli::RolloutsCommand,
    },
    /// Provisioning processes of a running instance: pending devices, approval.
    Provisioning {
        #[command(flatten)]
        client: cli::ClientArgs,
        #[command(subcommand)]
        command: cli::ProvisioningCommand,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML config file (keys: data_dir, http, grpc, mqtt, mqtt_provisioning,
    /// mqtt_accounts, arbiters, log).
    #[arg(long, env = "TWINFLEET_CONFIG")]
    config: Option<PathBuf>,
    /// Where the data lives [default: ./twinfleet-data].
    #[arg(long, env = "TWINFLEET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the HTTP API [default: 127.0.0.1:8080].
    #[arg(long, env = "TWINFLEET_HTTP")]
    http: Option<SocketAddr>,
    /// Address of the gRPC gateway (Hub, DeviceGateway) [default: 127.0.0.1:50051].
    #[arg(long, env = "TWINFLEET_GRPC")]
    grpc: Option<SocketAddr>,
    /// MQTT operational gateway: `host:port` to listen (embedded broker) or
    /// `mqtt://[user[:password]@]host[:port]` (external broker) [default: 127.0.0.1:1883].
    #[arg(long, env = "TWINFLEET_MQTT")]
    mqtt: Option<String>,
    /// MQTT provisioning gateway, same forms [default: 127.0.0.1:1884].
    #[arg(long, env = "TWINFLEET_MQTT_PROVISIONING")]
    mqtt_provisioning: Option<String>,
    /// An external Mosquitto's device and claim accounts: `none` (the operator keeps
    /// them) or `dynsec` (twinfleet keeps them in step with its credentials through the
    /// broker's dynamic-security plugin; the transformer's account must administer it)
    /// [default: none].
    #[arg(long, env = "TWINFLEET_MQTT_ACCOUNTS")]
    mqtt_accounts: Option<String>,
    /// A directory of device-type model files (`*.json`, e.g. device-types/); each type
    /// that does not exist yet is created at start.
    #[arg(long, env = "TWINFLEET_DEVICE_TYPES")]
    device_types: Option<PathBuf>,
    /// Worker arbiters for the twins [default: one per core].
    #[arg(long, env = "TWINFLEET_ARBITERS")]
    arbiters: Option<usize>,
    /// Log filter, e.g. `info` or `twinfleet=debug` [default: info].
    #[arg(long, env = "TWINFLEET_LOG")]
    log: Option<String>,
    /// The API token of the user `admin` on a fresh data directory. Without it, a fresh
    /// data directory gets a new admin token, printed once. Ignored (with a warning) on a
    /// directory set up before, unless `--rotate-admin-token` is given.
    #[arg(long, env = "TWINFLEET_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Replace the bootstrap admin's token (re-creating the user `admin` if it was
    /// deleted; earlier bootstrap tokens are revoked): with `--admin-token`, that one,
    /// else a new one printed once.
    #[arg(long)]
    rotate_admin_token: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Twins { client, command } => cli::twins(client, command),
        Command::Twin { client, command } => cli::twin(client, command),
        Command::Actors { client, query } => cli::actors(client, query),
        Command::Jobs { client, command } => cli::jobs(client, command),
        Command::Provisioning { client, command } => cli::provisioning(client, command),
        Command::Alerts { client, query } => cli::alerts(client, query),
        Command::Rollouts { client, command } => cli::rollouts(client, command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinfleet: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // Everything the server creates (the data directory, sled's files, snapshots made
    // later) is for its owner only: 0700 directories, 0600 files.
    #[allow(unsafe_code)]
    // Safety: umask only swaps the process's file-mode mask; it cannot fail and touches
    // no memory. It runs before any thread is started.
    unsafe {
        libc::umask(0o077);
    }
    // Small pages: faster spawns, ingest and restarts (see twinfleet::memory).
    if let Err(e) = twinfleet::memory::disable_transparent_huge_pages() {
        eprintln!("twinfleet: warning: could not turn transparent huge pages off ({e}); running with them");
    }
    let open_files = raise_open_files_limit();
    let device_types = args.device_types.clone();
    let admin_token = args.admin_token.clone();
    let rotate = args.rotate_admin_token;
    let file = match &args.config {
        Some(p) => PartialConfig::load(p).map_err(anyhow::Error::msg)?,
        None => PartialConfig::default(),
    };
    let cfg = resolve(
        PartialConfig {
            data_dir: args.data_dir,
            http: args.http,
            grpc: args.grpc,
            mqtt: args.mqtt,
            mqtt_provisioning: args.mqtt_provisioning,
            mqtt_accounts: args.mqtt_accounts,
            arbiters: args.arbiters,
            log: args.log,
            gateways: None,
            notify: None,
            exports: None,
        },
        file,
    )
    .map_err(anyhow::Error::msg)?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cfg.log).context("invalid --log filter")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match open_files {
        Some((before, after)) if after > before => {
            tracing::info!("open files limit raised from {before} to {after} (each connected device holds one)")
        }
        Some((_, after)) if after < 4096 => tracing::warn!(
            "open files limit is {after}: about that many devices can connect at once; raise the hard limit (ulimit -Hn, or LimitNOFILE= in a systemd unit)"
        ),
        Some((_, after)) => tracing::info!("open files limit {after} (each connected device holds one)"),
        None => tracing::warn!("cannot read the open files limit"),
    }
    actix_rt::System::new().block_on(serve(cfg, device_types, admin_token, rotate))
}

/// Raises the soft limit of open files to the hard one, before any thread starts: every
/// connected device holds a socket, and the usual soft limit (1,024) would stop a fleet
/// at about a thousand devices, each further connection failing with EMFILE. Returns
/// (before, after), or `None` if the limits cannot be read.
fn raise_open_files_limit() -> Option<(libc::rlim_t, libc::rlim_t)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // Safety: getrlimit(2) writes the struct we pass and nothing else.
    #[allow(unsafe_code)]
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // Safety: setrlimit(2) reads the struct we pass; it changes only this process's
        // limit, within the hard limit any process may reach.
        #[allow(unsafe_code)]
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some((before, lim.rlim_max));
        }
    }
    Some((before, before))
}

async fn serve(
    cfg: RunConfig,
    device_types: Option<PathBuf>,
    admin_token: Option<String>,
    rotate: bool,
) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "twinfleet starting");
    // Before anything listens: a SIGINT or SIGTERM from now on means a clean stop, even
    // one that arrives while the listeners are still starting.
    let stop = StopSignals::install()?;
    let data_dir = std::path::absolute(&cfg.data_dir).unwrap_or(cfg.data_dir.clone());
    tracing::info!("data directory: {}", data_dir.display());
    let settings = twinfleet::Settings { gateways: cfg.gateways.clone(), ..Default::default() };
    let platform = Platform::builder(&cfg.data_dir).arbiters(cfg.arbiters).settings(settings).start().await?;
    if let Some(dir) = &device_types {
        load_device_types(&platform, dir).await?;
    }
    let admin_token = admin_token.filter(|t| !t.is_empty());
    if rotate {
        let new = platform.rotate_admin_token(admin_token.as_deref()).await.context("cannot rotate the admin token")?;
        match new {
            Some(token) => println!("twinfleet: rotated the admin token; the new one (shown only now): {token}"),
            None => println!("twinfleet: rotated the admin token to the one given"),
        }
    } else if let Some(token) =
        platform.bootstrap_admin(admin_token.as_deref()).await.context("cannot set up the admin user")?
    {
        println!("twinfleet: created user admin; its API token (shown only now): {token}");
    }
    // Before any listener: every point acknowledged from now on is exported.
    let exporter = twinfleet_protocols::Exporter::start(platform.runtime().clone(), &cfg.data_dir, cfg.exports.clone())
        .map_err(anyhow::Error::msg)?;
    let http = HttpApi::start(platform.runtime().clone(), cfg.http, 1)
        .with_context(|| format!("cannot listen on {}", cfg.http))?;
    let grpc = GrpcGateway::start(platform.runtime().clone(), cfg.grpc)
        .with_context(|| format!("cannot listen on {} for gRPC", cfg.grpc))?;
    let mqtt_cfg = MqttConfig {
        operational: cfg.mqtt,
        provisioning: cfg.mqtt_provisioning,
        broker_accounts: cfg.mqtt_accounts,
        ..MqttConfig::default()
    };
    let mqtt = MqttGateway::start(platform.runtime().clone(), mqtt_cfg.clone()).await.with_context(|| {
        format!("cannot start the MQTT gateways ({} and {})", mqtt_cfg.operational, mqtt_cfg.provisioning)
    })?;
    let notifier = twinfleet_protocols::Notifier::start(platform.runtime().clone(), cfg.notify.clone())
        .map_err(anyhow::Error::msg)?;
    tracing::info!("HTTP API listening on http://{}", http.local_addr());
    tracing::info!("gRPC gateway listening on {}", grpc.local_addr());
    tracing::info!("MQTT gateways: operational {}, provisioning {}", mqtt.operational(), mqtt.provisioning());
    println!(
        "twinfleet: HTTP API on http://{}  gRPC on {}  MQTT on {} (provisioning {})  data in {}",
        http.local_addr(),
        grpc.local_addr(),
        mqtt.operational(),
        mqtt.provisioning(),
        data_dir.display()
    );

    stop.wait().await;
    tracing::info!("stopping: HTTP, gRPC and MQTT first, then twins, then a final flush");
    http.stop().await;
    grpc.stop().await;
    mqtt.stop().await;
    actix_rt::task::spawn_blocking(move || notifier.stop()).await.ok();
    actix_rt::task::spawn_blocking(move || exporter.stop()).await.ok();
    platform.shutdown().await;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Creates the device types of `dir/*.json` that do not exist yet (a new device type is a
/// new model file, not new code). A file that does not parse is an error at start.
async fn load_device_types(platform: &Platform, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read device types from {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        let spec: twinfleet::DeviceTypeSpec =
            serde_json::from_str(&text).with_context(|| format!("device type file {}", f.display()))?;
        if platform.device_type(spec.id.as_str()).is_ok() {
            tracing::info!("device type {} exists; {} not applied", spec.id, f.display());
            continue;
        }
        let id = spec.id.clone();
        platform.create_device_type(spec).await.with_context(|| format!("device type file {}", f.display()))?;
        tracing::info!("device type {id} created from {}", f.display());
    }
    Ok(())
}

/// SIGINT and SIGTERM, caught from the moment they are installed (a signal that
/// arrives before `wait` is kept and ends the wait at once).
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            int: signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => tracing::info!("received SIGINT (Ctrl-C)"),
            _ = self.term.recv() => tracing::info!("received SIGTERM"),
        }
    }
}
