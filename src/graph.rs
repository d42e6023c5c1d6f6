//! The pipeline graph as Graphviz dot or Mermaid, edges labelled with input and artifact kind.

use crate::pipeline::Pipeline;

pub fn dot(p: &Pipeline) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=rounded];\n",
        esc(&p.name)
    );
    for s in &p.stages {
        out.push_str(&format!(
            "  \"{}\" [label=\"{}\\n({}) → {}\"];\n",
            esc(&s.name),
            esc(&s.name),
            s.kind.name(),
            s.kind.descriptor().output
        ));
    }
    for &i in &p.order {
        let s = &p.stages[i];
        for b in &s.inputs {
            for &u in &b.stages {
                out.push_str(&format!(
                    "  \"{}\" -> \"{}\" [label=\"{}\"];\n",
                    esc(&p.stages[u].name),
                    esc(&s.name),
                    esc(&b.name)
                ));
            }
        }
    }
    out.push_str("}\n");
    out
}

pub fn mermaid(p: &Pipeline) -> String {
    let mut out = String::from("flowchart LR\n");
    for s in &p.stages {
        out.push_str(&format!(
            "  {}[\"{}<br/>{} → {}\"]\n",
            id(&s.name),
            s.name,
            s.kind.name(),
            s.kind.descriptor().output
        ));
    }
    for &i in &p.order {
        let s = &p.stages[i];
        for b in &s.inputs {
            for &u in &b.stages {
                out.push_str(&format!(
                    "  {} -->|{}| {}\n",
                    id(&p.stages[u].name),
                    b.name,
                    id(&s.name)
                ));
            }
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Mermaid ids cannot contain `-`; stage names can.
fn id(name: &str) -> String {
    name.replace('-', "_")
}
