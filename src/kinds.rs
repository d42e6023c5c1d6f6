//! The closed set of stage kinds. Adding a kind means adding a variant here; the exhaustive
//! matches then show every place that must handle it.

use orchestrate_stage::{StageContext, StageDescriptor, StageError, StageOutput};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StageKind {
    Shell,
    #[cfg(feature = "corpus")]
    Ingest,
    #[cfg(feature = "corpus")]
    Bpe,
    #[cfg(feature = "model")]
    Train,
    #[cfg(feature = "model")]
    Quantize,
    #[cfg(feature = "model")]
    Evaluate,
    #[cfg(feature = "model")]
    Deploy,
}

impl StageKind {
    pub const ALL: &'static [StageKind] = &[
        StageKind::Shell,
        #[cfg(feature = "corpus")]
        StageKind::Ingest,
        #[cfg(feature = "corpus")]
        StageKind::Bpe,
        #[cfg(feature = "model")]
        StageKind::Train,
        #[cfg(feature = "model")]
        StageKind::Quantize,
        #[cfg(feature = "model")]
        StageKind::Evaluate,
        #[cfg(feature = "model")]
        StageKind::Deploy,
    ];

    pub fn descriptor(self) -> &'static StageDescriptor {
        match self {
            StageKind::Shell => &orchestrate_shell::DESCRIPTOR,
            #[cfg(feature = "corpus")]
            StageKind::Ingest => &orchestrate_corpus::ingest::DESCRIPTOR,
            #[cfg(feature = "corpus")]
            StageKind::Bpe => &orchestrate_corpus::bpe::DESCRIPTOR,
            #[cfg(feature = "model")]
            StageKind::Train => &orchestrate_model::train::DESCRIPTOR,
            #[cfg(feature = "model")]
            StageKind::Quantize => &orchestrate_quantize::DESCRIPTOR,
            #[cfg(feature = "model")]
            StageKind::Evaluate => &orchestrate_evaluate::DESCRIPTOR,
            #[cfg(feature = "model")]
            StageKind::Deploy => &orchestrate_serve::deploy::DESCRIPTOR,
        }
    }

    pub fn name(self) -> &'static str {
        self.descriptor().kind
    }

    pub fn from_name(name: &str) -> Option<StageKind> {
        StageKind::ALL.iter().copied().find(|k| k.name() == name)
    }

    pub fn names() -> Vec<&'static str> {
        StageKind::ALL.iter().map(|k| k.name()).collect()
    }

    /// Does the stage's work; called on a blocking thread.
    pub fn run(self, ctx: &StageContext<'_>) -> Result<StageOutput, StageError> {
        match self {
            StageKind::Shell => orchestrate_shell::run(ctx),
            #[cfg(feature = "corpus")]
            StageKind::Ingest => orchestrate_corpus::ingest::run(ctx),
            #[cfg(feature = "corpus")]
            StageKind::Bpe => orchestrate_corpus::bpe::run(ctx),
            #[cfg(feature = "model")]
            StageKind::Train => orchestrate_model::train::run(ctx),
            #[cfg(feature = "model")]
            StageKind::Quantize => orchestrate_quantize::run(ctx),
            #[cfg(feature = "model")]
            StageKind::Evaluate => orchestrate_evaluate::run(ctx),
            #[cfg(feature = "model")]
            StageKind::Deploy => orchestrate_serve::deploy::run(ctx),
        }
    }
}
