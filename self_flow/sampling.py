"""Pure-JAX samplers that turn noise into data with any velocity model (ODE, SDE, CFG).

They live apart from the model so that evaluation, tests and notebooks can drive the same code
with a Flax module, a closed-form field or a guided wrapper: every sampler only needs a
`velocity_fn(x, t, cond) -> v`, with x (B, ...), t (B,) float32 and cond a pytree of per-sample
arrays (e.g. class labels (B,)).

Convention (paper §3.1): x_t = (1 - t) x0 + t x1, x0 data, x1 ~ N(0, I), t = 1 pure noise; the
model predicts v = x1 - x0, and sampling integrates dx/dt = v from t = 1 down to t = 0.

Every function is jittable with `velocity_fn` closed over and the method, step counts, shift and
guidance settings static (Python values); the step loops are `lax.fori_loop`s, so compile time
does not grow with the number of steps.
"""

import math

import jax
import jax.numpy as jnp

from self_flow.objectives import timeshift

ODE_METHODS = ("euler", "heun")
METHODS = ODE_METHODS + ("sde",)


def _check_num_steps(num_steps, minimum: int, name: str = "num_steps"):
  """Step counts size Python loops and grids, so they must be concrete ints."""
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < minimum:
    raise ValueError(f"{name}={num_steps!r}; allowed: an int >= {minimum}.")


def _call(velocity_fn, x, t, cond):
  """Evaluates the model at one scalar time; casts v to x's dtype to keep the loop carry fixed."""
  t_batch = jnp.full((x.shape[0],), t, dtype=jnp.float32)
  return velocity_fn(x, t_batch, cond).astype(x.dtype)


def time_grid(num_steps: int, shift: float) -> jnp.ndarray:
  """Returns num_steps + 1 times from exactly 1 down to exactly 0, warped by the sampleshift.

  A uniform grid u is mapped through s(a, u) = a u / (1 + (a - 1) u), the same timeshift the
  trainer applies to p(t): a = 1 keeps the grid uniform, a > 1 packs steps near the noise end
  (t = 1), where high-resolution samples decide their global structure. Both endpoints are fixed
  points of s, so the integration always starts at pure noise and ends at data.
  """
  _check_num_steps(num_steps, 1)
  if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (
      math.isfinite(shift) and shift > 0):
    raise ValueError(f"shift={shift!r}; allowed: a finite float > 0 (1.0 = uniform grid).")
  uniform = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
  return timeshift(uniform, float(shift))


def guided_velocity_fn(velocity_fn, *, cfg_scale: float, null_cond,
                       guidance_interval: tuple[float, float] = (0.0, 1.0)):
  """Wraps `velocity_fn` with classifier-free guidance: v_u + cfg_scale * (v_c - v_u).

  The conditional and unconditional branches run as ONE model call on concat([x, x]) with
  concat([cond, null_cond]), so the model sees a single batch of 2B (one compile, full device
  utilisation). Leaves of `null_cond` are broadcast to the shapes and dtypes of the matching
  `cond` leaves, so a scalar null label works for any batch size.

  Guidance is applied only to samples whose paper-convention t lies in the closed interval
  guidance_interval = (lo, hi); elsewhere the conditional velocity is returned, as in guidance
  interval sampling (Kynkäänniemi et al., 2024), which keeps guidance off the steps where it hurts
  diversity or detail.

  With cfg_scale == 1 guidance is the identity, so `velocity_fn` itself is returned: the result is
  bit-for-bit the unguided one and the unconditional branch is never evaluated (`null_cond` and
  `guidance_interval` are still validated but otherwise unused).
  """
  if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not (
      math.isfinite(cfg_scale) and cfg_scale >= 0):
    raise ValueError(f"cfg_scale={cfg_scale!r}; allowed: a finite float >= 0 (1.0 = no guidance).")
  try:
    lo, hi = (float(v) for v in guidance_interval)
  except (TypeError, ValueError) as err:
    raise ValueError(f"guidance_interval={guidance_interval!r}; allowed: a pair (lo, hi) of "
                     "floats with 0 <= lo <= hi <= 1.") from err
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"guidance_interval={guidance_interval!r}; allowed: a pair (lo, hi) with "
                     "0 <= lo <= hi <= 1 (paper-convention t, 1 = noise).")
  if null_cond is None:
    raise ValueError("null_cond=None; allowed: a pytree shaped like cond (e.g. the null labels).")
  if cfg_scale == 1:
    return velocity_fn
  scale = float(cfg_scale)

  def guided(x, t, cond):
    null = jax.tree.map(lambda c, n: jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape),
                        cond, null_cond)
    both_cond = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null)
    both_v = velocity_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
                         both_cond)
    v_cond, v_uncond = jnp.split(both_v, 2, axis=0)
    v_guided = v_uncond + scale * (v_cond - v_uncond)
    inside = (t >= lo) & (t <= hi)
    inside = inside.reshape(inside.shape + (1,) * (x.ndim - 1))
    return jnp.where(inside, v_guided, v_cond)

  return guided


def sample_ode(velocity_fn, x1, cond, *, num_steps: int, shift: float = 1.0,
               method: str = "euler"):
  """Integrates dx/dt = v from t = 1 (x1, noise) to t = 0 on `time_grid(num_steps, shift)`.

  "euler" makes num_steps model calls. "heun" is the explicit trapezoidal rule (Euler predictor,
  then the average of the slopes at both ends) on EVERY step, the last one into t = 0 included:
  unlike EDM's denoiser parameterisation, a flow-matching velocity is well defined at t = 0, so
  keeping the corrector there preserves second-order accuracy at the cost of 2 * num_steps calls.
  """
  if method not in ODE_METHODS:
    raise ValueError(f"method={method!r}; allowed ODE methods: {ODE_METHODS}.")
  grid = time_grid(num_steps, shift)

  def step(i, x):
    t_cur, t_next = grid[i], grid[i + 1]
    dt = (t_next - t_cur).astype(x.dtype)
    v_cur = _call(velocity_fn, x, t_cur, cond)
    x_euler = x + dt * v_cur
    if method == "euler":
      return x_euler
    v_next = _call(velocity_fn, x_euler, t_next, cond)
    return x + dt * 0.5 * (v_cur + v_next)

  return jax.lax.fori_loop(0, num_steps, step, x1)


def sample_sde(velocity_fn, x1, cond, rng, *, num_steps: int = 250, last_step_size: float = 0.04):
  """The official Self-Flow / SiT Euler–Maruyama sampler, driven by a paper-convention model.

  SiT's time is u = 1 - t (u = 0 noise, u = 1 data) and its velocity v_sit = x0 - x1 = -v; the
  model is always called with t = 1 - u and its output negated. With the linear path,
  score(x, u) = (u v_sit - x) / (1 - u) and the "sigma" diffusion w(u) = 1 - u (norm 1), the SDE
  dx = (v_sit + w score) du + sqrt(2 w) dW has the same marginals as the probability-flow ODE,
  and its noise corrects errors accumulated along the way.

  Steps: num_steps - 1 stochastic steps from u = 0 on linspace(0, 1 - last_step_size, num_steps),
  x <- x + drift du + sqrt(2 w(u) du) eps; then one deterministic "Mean" step of size
  last_step_size from u = 1 - last_step_size to 1 along the drift, which avoids the score's
  1 / (1 - u) singularity at u = 1. That makes exactly num_steps model calls. `rng` is folded
  with the step index, so results depend only on rng, not on how the loop is compiled.
  """
  _check_num_steps(num_steps, 2)
  if isinstance(last_step_size, bool) or not isinstance(last_step_size, (int, float)) or not (
      0.0 < last_step_size < 1.0):
    raise ValueError(f"last_step_size={last_step_size!r}; allowed: a float in (0, 1) (the score "
                     "diverges at u = 1, so the final step cannot be stochastic).")
  u_grid = jnp.linspace(0.0, 1.0 - last_step_size, num_steps, dtype=jnp.float32)
  du = (1.0 - last_step_size) / (num_steps - 1)

  def drift(x, u):
    v_sit = -_call(velocity_fn, x, 1.0 - u, cond)
    w = (1.0 - u).astype(x.dtype)
    score = (u.astype(x.dtype) * v_sit - x) / w
    return v_sit + w * score, w

  def step(i, x):
    u = u_grid[i]
    d, w = drift(x, u)
    eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    return x + d * du + jnp.sqrt(2.0 * w * du) * eps

  x = jax.lax.fori_loop(0, num_steps - 1, step, x1)
  d, _ = drift(x, u_grid[-1])
  return x + d * last_step_size


def sample(velocity_fn, x1, cond, rng, *, method: str, num_steps: int, shift: float):
  """Samples with one of METHODS; the single entry point evaluation configs name by string.

  "euler" / "heun" run `sample_ode` on the shifted grid and ignore `rng`; "sde" runs
  `sample_sde` with its default last step and ignores `shift` (the official SDE sampler uses a
  uniform u-grid).
  """
  if method in ODE_METHODS:
    return sample_ode(velocity_fn, x1, cond, num_steps=num_steps, shift=shift, method=method)
  if method == "sde":
    return sample_sde(velocity_fn, x1, cond, rng, num_steps=num_steps)
  raise ValueError(f"sampling method={method!r}; allowed: {METHODS}.")
