//! The `tiergate` command: serve, check a configuration, or ask a running sidecar for usage.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tiergate::config::{Backend, Config};
use tiergate::pb;

/// Enforces WhatsApp Business messaging limits across many sender processes.
///
/// Senders call the Admit RPC before each business-initiated message; tiergate answers ADMITTED
/// or DENIED so that, together, they never reach more unique recipients in the rolling 24 hours
/// than the business's tier allows. Sidecars that share a Redis share one count.
#[derive(Parser)]
#[command(name = "tiergate", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: gRPC on server.grpc_listen, /metrics /livez /readyz on server.admin_listen.
    ///
    /// Without a config file it runs on the embedded in-memory store with Meta's 2025 ladder.
    /// Every key can also be set as TIERGATE_<SECTION>_<KEY> (e.g. TIERGATE_STORE_URL); flags
    /// win over the environment, which wins over the file. Logs go to stderr; set TIERGATE_LOG
    /// (e.g. "debug" or "tiergate=debug") to change the level.
    Serve {
        /// TOML configuration file.
        #[arg(long, short, env = "TIERGATE_CONFIG")]
        config: Option<PathBuf>,
        /// gRPC listen address (server.grpc_listen).
        #[arg(long)]
        grpc_listen: Option<std::net::SocketAddr>,
        /// Admin HTTP listen address (server.admin_listen).
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
        /// Redis URL (store.url); implies store.backend = "redis".
        #[arg(long)]
        redis_url: Option<String>,
    },
    /// Validate a configuration file (and the TIERGATE_* environment) and print what it resolves to.
    CheckConfig {
        /// TOML configuration file.
        file: PathBuf,
    },
    /// Operate on the store that sidecars share.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Ask a running sidecar for the usage of a portfolio (or of one number in per-number scope).
    Usage {
        /// Portfolio id.
        #[arg(long)]
        portfolio: String,
        /// Sender phone number id, needed in per-number scope.
        #[arg(long, default_value = "")]
        sender: String,
        /// The sidecar's gRPC address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Sent as `authorization: Bearer <token>`: the sidecar's sender (or admin) token, when it
        /// has one. Inside the sidecar's container the variable is already set.
        #[arg(long, env = "TIERGATE_SERVER_SENDER_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Record this configuration's shared policy in the store, replacing the one recorded.
    ///
    /// Sidecars sharing a store must agree on store.key_prefix, store.hash_key, policy.window,
    /// policy.service_window, policy.scope, policy.ladder, policy.default_tier and every
    /// [[portfolios]] tier. The first sidecar records them in the store; one whose configuration
    /// differs refuses to serve (FAILED_PRECONDITION, /readyz 503 naming each key). To change
    /// them on purpose, run this with the new configuration, then roll the sidecars: those still
    /// on the old configuration refuse from their next health probe until restarted.
    SetPolicy {
        /// TOML configuration file.
        #[arg(long, short, env = "TIERGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Redis URL (store.url); implies store.backend = "redis".
        #[arg(long)]
        redis_url: Option<String>,
    },
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(Config::load(path, std::env::vars())?)
}

async fn serve(
    config: Option<PathBuf>,
    grpc_listen: Option<std::net::SocketAddr>,
    admin_listen: Option<std::net::SocketAddr>,
    redis_url: Option<String>,
) -> anyhow::Result<()> {
    let mut cfg = load(config.as_deref())?;
    if let Some(a) = grpc_listen {
        cfg.server.grpc_listen = a;
    }
    if let Some(a) = admin_listen {
        cfg.server.admin_listen = a;
    }
    if let Some(url) = redis_url {
        cfg.store.backend = Backend::Redis;
        cfg.store.url = Some(url);
    }
    let settings = cfg.validate().context("invalid configuration")?;
    let grpc = tokio::net::TcpListener::bind(settings.server.grpc_listen)
        .await
        .with_context(|| format!("cannot listen on server.grpc_listen = {}", settings.server.grpc_listen))?;
    let admin = tokio::net::TcpListener::bind(settings.server.admin_listen)
        .await
        .with_context(|| format!("cannot listen on server.admin_listen = {}", settings.server.admin_listen))?;
    tiergate::server::run(settings, grpc, admin, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received."),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received."),
    }
}

fn check_config(file: PathBuf) -> anyhow::Result<()> {
    let settings = load(Some(&file))?.validate()?;
    println!("{}: ok", file.display());
    println!("grpc_listen   {}", settings.server.grpc_listen);
    println!("admin_listen  {}", settings.server.admin_listen);
    let store = match &settings.store {
        tiergate::config::StoreSettings::Memory { .. } => "memory".to_string(),
        tiergate::config::StoreSettings::Redis { options, .. } => format!("redis, {}", options.topology),
    };
    println!("store         {store}");
    println!("scope         {:?}", settings.scope);
    println!("window        {}", humantime::format_duration(settings.windows.window));
    println!("service       {}", humantime::format_duration(settings.windows.service_window));
    println!("ladder        {}", settings.ladder.names());
    println!("default_tier  {}", settings.default_tier.name);
    println!("tier_source   {:?}", settings.tier_source);
    println!("reserve       {}% of the limit kept from marketing", f64::from(settings.reserve_bp) / 100.0);
    println!("mode          {}", settings.mode.as_str());
    match settings.rates.throughput {
        Some(t) => println!(
            "throughput    {} msg/s per number unless listed ({} listed), bursts of {}",
            t.default_mps,
            settings.throughput.numbers.len(),
            humantime::format_duration(t.burst)
        ),
        None => println!("throughput    off"),
    }
    match settings.rates.pair {
        Some(p) => {
            println!(
                "pair_rate     1 per {} per (number, user), bursts of {}",
                humantime::format_duration(p.interval),
                p.burst
            )
        }
        None => println!("pair_rate     off"),
    }
    println!("webhooks      {}", if settings.webhooks.is_some() { "on, at /webhooks/whatsapp" } else { "off" });
    let set = |token: &Option<String>| if token.is_some() { "set" } else { "not set" };
    println!(
        "api tokens    sender {}, admin {}",
        set(&settings.server.sender_token),
        set(&settings.server.admin_token)
    );
    for (id, tier) in &settings.portfolio_tiers {
        println!("portfolio     {id} = {}", tier.name);
    }
    for (id, mode) in &settings.portfolio_modes {
        println!("portfolio     {id} mode {}", mode.as_str());
    }
    for (waba, id) in &settings.wabas {
        println!("waba          {waba} -> {id}");
    }
    Ok(())
}

async fn usage(portfolio: String, sender: String, addr: String, token: Option<String>) -> anyhow::Result<()> {
    let mut client = pb::limiter_client::LimiterClient::connect(addr.clone())
        .await
        .with_context(|| format!("cannot reach a sidecar at {addr}"))?;
    let mut request = tonic::Request::new(pb::GetUsageRequest { portfolio_id: portfolio, sender_id: sender });
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().context("--token: must be visible ASCII")?;
        request.metadata_mut().insert("authorization", value);
    }
    let u = client.get_usage(request).await.map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?.into_inner();
    println!("portfolio          {}", u.portfolio_id);
    if !u.sender_id.is_empty() {
        println!("sender             {}", u.sender_id);
    }
    println!("tier               {}", u.tier);
    println!("unique_recipients  {}", u.unique_recipients);
    if u.unlimited {
        println!("limit              unlimited");
    } else {
        println!("limit              {}", u.limit);
        println!("remaining          {}", u.remaining);
    }
    if let Some(t) = u.next_slot_at {
        let t = std::time::SystemTime::try_from(t).unwrap_or(std::time::UNIX_EPOCH);
        println!("next_slot_at       {}", humantime::format_rfc3339_millis(t));
    }
    Ok(())
}

async fn set_policy(config: Option<PathBuf>, redis_url: Option<String>) -> anyhow::Result<()> {
    use tiergate::shared_policy::SharedPolicy;
    let mut cfg = load(config.as_deref())?;
    if let Some(url) = redis_url {
        cfg.store.backend = Backend::Redis;
        cfg.store.url = Some(url);
    }
    let settings = cfg.validate().context("invalid configuration")?;
    let tiergate::config::StoreSettings::Redis { options, .. } = &settings.store else {
        anyhow::bail!("store.backend is \"memory\": a memory store belongs to one sidecar and shares no policy");
    };
    let target = options.topology.to_string();
    let store = tiergate::server::open_store(&settings)?;
    let mine = SharedPolicy::of(&settings);
    let failed = |e: tiergate::store::StoreError| anyhow::anyhow!("{target}: {e}");
    let before = store.shared_policy(&mine.encode(), false).await.map_err(failed)?;
    store.shared_policy(&mine.encode(), true).await.map_err(failed)?;
    match SharedPolicy::decode(&before) {
        Ok(before) => {
            let changed = mine.differences(&before);
            if changed.is_empty() {
                println!("{target}: the shared policy already was this configuration's.");
            }
            for d in &changed {
                println!("{}: {} -> {}", d.key, d.recorded, d.mine);
            }
        }
        Err(e) => println!("replaced a policy this version cannot read ({e})"),
    }
    println!("{target}: recorded this configuration's shared policy.");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TIERGATE_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config, grpc_listen, admin_listen, redis_url } => {
                serve(config, grpc_listen, admin_listen, redis_url).await
            }
            Command::CheckConfig { file } => check_config(file),
            Command::Usage { portfolio, sender, addr, token } => usage(portfolio, sender, addr, token).await,
            Command::Store { command: StoreCommand::SetPolicy { config, redis_url } } => {
                set_policy(config, redis_url).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tiergate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
