#pragma once
// compare_layers --save DIR / --resume DIR: one safetensors file per task and variant holding
// everything a run's future depends on (the model's weights and buffers, Adam's state, the
// lambda controller, the batch-sampling RNG) and its history (the curves so far, the loss EMA,
// the timers), so that a resumed run prints and writes the same losses as an uninterrupted one.
#include <spex/io/io.hpp>
#include <string>
#include <vector>

namespace compare {

/// What a run carries from step to step besides the model.
struct RunHistory {
  std::vector<double> step, train_loss, sparsity, lambda, eval_step, val_loss;
  double ema = NAN, seconds = 0, opt_seconds = 0;
  int steps_done = 0;
};

inline std::string checkpoint_path(const std::string& dir, const std::string& task, const std::string& variant) {
  return dir + "/" + task + "-" + variant + ".safetensors";
}

template <class Model>
void save_run(const std::string& path, Model& model, const spex::LambdaController& ctl, const spex::Rng& rng,
              const RunHistory& h) {
  spex::SafetensorsWriter w;
  w.add(model.parameters(), "model.").add_optimizer("optim.", model.optimizer()).add_state("lambda", ctl).add_state("rng", rng);
  const auto add_series = [&](const char* name, const std::vector<double>& v) {
    w.add_tensor({std::string("history.") + name, spex::DType::F64, {std::int64_t(v.size())}, v.data(), spex::DType::F64});
  };
  add_series("step", h.step);
  add_series("train_loss", h.train_loss);
  add_series("sparsity", h.sparsity);
  add_series("lambda", h.lambda);
  add_series("eval_step", h.eval_step);
  add_series("val_loss", h.val_loss);
  w.set_metadata("history", nlohmann::json{{"steps_done", h.steps_done}, {"ema", h.ema}, {"seconds", h.seconds},
                                           {"opt_seconds", h.opt_seconds}}.dump());
  w.write(path);
}

/// Restores a run saved by save_run (all-or-nothing); returns its history.
template <class Model>
RunHistory load_run(const std::string& path, Model& model, spex::LambdaController& ctl, spex::Rng& rng) {
  spex::SafetensorsLoader ld(path);
  ld.parameters(spex::prefixed(model.parameters(), "model."), "model.").optimizer(model.optimizer(), "optim.");
  ld.state(ctl, "lambda").state(rng, "rng");
  RunHistory h;
  const auto read_series = [&](const char* name, std::vector<double>& v) {
    const spex::TensorInfo& t = ld.file().at(std::string("history.") + name);
    if (t.dtype != spex::DType::F64 || t.shape.size() != 1) throw spex::Error(path + ": " + t.name + " is not an F64 vector");
    v.resize(std::size_t(t.shape[0]));
    spex::convert_from_bytes(ld.file().data(t), t.dtype, v.data(), v.size());
  };
  read_series("step", h.step);
  read_series("train_loss", h.train_loss);
  read_series("sparsity", h.sparsity);
  read_series("lambda", h.lambda);
  read_series("eval_step", h.eval_step);
  read_series("val_loss", h.val_loss);
  const nlohmann::json j = nlohmann::json::parse(ld.metadata("history"));
  h.steps_done = j.at("steps_done").get<int>();
  h.ema = j.at("ema").is_null() ? NAN : j.at("ema").get<double>();
  h.seconds = j.at("seconds").get<double>();
  h.opt_seconds = j.at("opt_seconds").get<double>();
  if (h.steps_done < 0 || h.step.size() != std::size_t(h.steps_done))
    throw spex::Error(path + ": the history does not match steps_done = " + std::to_string(h.steps_done));
  ld.commit();
  return h;
}

}  // namespace compare
